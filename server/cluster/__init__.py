"""Scale-out on Ray Serve (the optional `ray` extra): an ingress deployment serving the whole
HTTP API and N engine replicas, each with the base model and its own adapter pool; adapter
requests go to the replicas that hold their adapter (Ray Serve model multiplexing).

- `replica.py`: EngineReplica, the engine deployment (one Engine per replica).
- `proxy.py`: ClusterEngine, what the ingress's routers see instead of an Engine: the same
  interface, over DeploymentHandles (requests, adapter changes) and replica reports (views).
- `reports.py`: each replica's state (adapters, metrics, pid) on shared storage.
- `app.py`: the ingress deployment and the application builders (`serve run` configs too).
- `launch.py`: `adapterserve serve --replicas N` / `--ray-address`.

Only this package imports ray.
"""
