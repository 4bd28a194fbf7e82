"""splitserve on a Ray cluster through Ray Serve (`splitserve up/scale/status/down`).

Ray Serve supplies the machinery (replicas, health checks, restarts, autoscaling, one placement
group per replica); the serving pieces are the ones `splitserve serve` runs: each worker replica
starts the same worker process as the local launcher, the router is the same FastAPI app, the
control plane the same Redis. See docs/ray.md.
"""

APP_NAME = "splitserve"
NAMESPACE = "splitserve"
CONTROL_PLANE_ACTOR = "splitserve-control-plane"
POOL_DEPLOYMENTS = ("prefill", "decode")
ROUTER_DEPLOYMENT = "router"
