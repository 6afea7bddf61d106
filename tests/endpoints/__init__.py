"""Tests of the HTTP layer (endpoints/): in-process through Litestar's client, and a real server."""
