"""loraplex as a Ray Serve application: engine replicas behind one ingress, routed by adapter.

Only `loraplex serve-ray` imports this package (it needs `pip install 'loraplex[ray]'`); one process stays the
default and needs no Ray. Each replica is a whole loraplex server (`server.api.create_app` over
`server.engine.factory.build_engine`) driven in-process; the ingress forwards HTTP requests to them.
"""
