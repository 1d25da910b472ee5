"""The AstrID service: scoring API, review page, label store and active-learning queue.

``app.create_app`` (FastAPI, run by ``astrid serve``), ``store.open_store`` (SQLite or
PostgreSQL labels with full history), ``queue.next_candidate`` (uncertainty sampling with
leases), ``payload.read_upload`` (uploaded triplets) and ``render.stamp_png`` (review stamps).
Nothing is imported here, so that ``astrid.serve.store`` stays usable without FastAPI.
"""
