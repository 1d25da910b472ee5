"""The settings of ``astrid demo`` (``configs/demo.yaml`` holds the same, for ``astrid run``).

About a dozen 2048² simulated pairs with transients and artefacts through the whole chain
with the packaged model, sized to finish within five minutes on a 2-core machine.
"""

from __future__ import annotations

from astrid.config import Settings

DEMO: dict = {
    "sim": {"pairs": 12, "size_px": 2048, "seed": 42},
    "pipeline": {
        "source": "sim",
        "stages": ["simulate", "diff", "stamps", "score", "report"],
        "executor": "processes",
        "workers": 2,
    },
}


def demo_settings() -> Settings:
    """The demo's settings (defaults everywhere else)."""
    return Settings.model_validate(DEMO)
