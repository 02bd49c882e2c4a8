"""Tenants: API keys (stored as SHA-256 hashes) that reach only some adapters, within per-tenant quotas.

Plain Python with no HTTP in it: the key file (`keyfile`), key hashing and constant-time lookup (`keys`), adapter
scopes by name or glob (`scope`), sliding-window quotas (`quota`), the live set of tenants that a reload swaps
(`directory`), and the engine as one tenant sees it (`engine_view`). `server.api.tenancy` plugs it into FastAPI.
"""
