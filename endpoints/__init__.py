"""The HTTP layer (Litestar): `route_handlers(registry, settings, api_token=...)` lists every route.

It lives in endpoints/routes.py so that the composition root imports a submodule: the import
contract lets carwash_jobs.app reach `endpoints.**`, not the package itself.
"""

from endpoints.routes import route_handlers

__all__ = ["route_handlers"]
