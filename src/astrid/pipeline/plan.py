"""Which stages a run has, which of them this invocation runs, and on which pairs.

The chain depends on where the images come from (``pipeline.source``):

- ``sim``: simulate -> diff -> stamps -> score -> report
- ``local``: index -> diff -> stamps -> score -> report (a folder of FITS)
- ``archive``: catalog -> query -> pairs -> download -> diff -> stamps -> score -> report

``pipeline.stages`` switches stages on (the archive acquisition names stand for ``simulate`` or
``index`` when the source is not the archive); ``--stage NAME`` or ``--stage A:B`` picks the
part of the chain this invocation may compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from astrid.config import PipelineSettings
from astrid.errors import AstridError, ConfigError
from astrid.pipeline.stages import ALL_STAGES

_ACQUISITION = {
    "sim": ("simulate",),
    "local": ("index",),
    "archive": ("catalog", "query", "pairs", "download"),
}
_PROCESSING = ("diff", "stamps", "score", "report")
_ARCHIVE_NAMES = frozenset(_ACQUISITION["archive"])


@dataclass(frozen=True)
class Chain:
    """The stages of a run in order, split by where they execute.

    ``before``: whole-run stages that produce the pair list (catalog, query, pairs, index);
    ``per_pair``: stages run once per pair in a worker; ``after``: whole-run stages (report).
    ``selected``: the stages this invocation may compute; the others must already be done.
    """

    before: tuple[str, ...]
    per_pair: tuple[str, ...]
    after: tuple[str, ...]
    selected: frozenset[str]

    @property
    def stages(self) -> tuple[str, ...]:
        return self.before + self.per_pair + self.after


def resolve_chain(settings: PipelineSettings, stage_spec: str | None = None,
                  config_path: Path | None = None) -> Chain:
    """The chain of a config, and the stages selected by ``--stage`` (all when None).

    Raises
    ------
    ConfigError
        An unknown stage name, or a stage switched on without the stage it needs.
    """
    where = f"{config_path}: " if config_path else ""
    listed = list(settings.stages)
    for name in listed:
        if name not in ALL_STAGES:
            raise ConfigError(f"{where}unknown stage '{name}' in pipeline.stages "
                              f"(known: {', '.join(ALL_STAGES)})")
    acquisition = _ACQUISITION[settings.source]
    enabled = []
    for name in acquisition + _PROCESSING:
        on = name in listed
        if settings.source != "archive" and name in acquisition:
            # The archive acquisition names stand for this source's own acquisition.
            on = on or bool(_ARCHIVE_NAMES & set(listed))
        if on:
            enabled.append(name)
    full = list(acquisition + _PROCESSING)
    # Each stage needs the one before it, except the report, which shows whatever exists.
    for name in enabled:
        if name == "report":
            continue
        i = full.index(name)
        if i > 0 and full[i - 1] not in enabled:
            raise ConfigError(f"{where}pipeline.stages: '{name}' needs '{full[i - 1]}'")
    if not enabled:
        raise ConfigError(f"{where}pipeline.stages: no stage of the '{settings.source}' "
                          f"source is switched on")
    before = tuple(n for n in enabled if n in ("catalog", "query", "pairs", "index"))
    per_pair = tuple(n for n in enabled if n in ("simulate", "download", "diff", "stamps", "score"))
    after = tuple(n for n in enabled if n == "report")
    stages = before + per_pair + after
    return Chain(before, per_pair, after, _select(stages, stage_spec))


def _select(stages: tuple[str, ...], spec: str | None) -> frozenset[str]:
    if not spec:
        return frozenset(stages)

    def index(name: str) -> int:
        name = name.strip()
        if name not in stages:
            raise AstridError(f"--stage: '{name}' is not a stage of this run "
                              f"(stages: {', '.join(stages)})")
        return stages.index(name)

    if ":" in spec:
        start, _, stop = spec.partition(":")
        i = index(start) if start.strip() else 0
        j = index(stop) if stop.strip() else len(stages) - 1
        if j < i:
            raise AstridError(f"--stage: '{spec}' runs backwards (stages: {', '.join(stages)})")
        return frozenset(stages[i:j + 1])
    return frozenset({stages[index(spec)]})
