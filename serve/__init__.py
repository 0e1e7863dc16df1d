"""`mf-serve`: MegaFusion over HTTP on Ray Serve, one layer above the runtime.

`request` (what a request may ask for) and `config` (what a server is started with) are plain functions with
no Ray; `model` holds one replica's networks and runs requests (torch, no Ray); `app` is the Ray Serve
application (a FastAPI ingress and the model deployment). Ray is imported by `app` alone. SD3 / FLUX run through
`flow_model` (the flow runtime), `flow_conditioned` (their ControlNets and IP-Adapter) and `flow_config` (their flags).
"""
