"""Several lbproxy processes that route as one.

- `workers`: `lbproxy serve --workers N`, N full proxies on one host sharing the port.
- `worker_metrics`: one `/metrics` scrape shows every worker of the host.
- `host_admin`: the admin API (drain, undrain, reload, backends) acts on every worker.
- `shared_state`: the approximate prefix index and session affinity shared through Redis
  (config `state: {redis: ...}`) by the workers and replicas of one fleet.
- `flow_share`: each live replica takes its share of every backend's concurrency limit.
- `wiring`: what `lbproxy.proxy.app` calls to start and stop the above.
"""
