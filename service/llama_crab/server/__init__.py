"""The llama-crab gRPC service (`llama-crab serve`).

Modules: `config` (options and the `serve` command line), `app` (server lifecycle),
`servicer` (the RPCs), `relay` (handle events into asyncio), `auth`, `metrics`, `logs`,
and `testing` (an in-process server for tests).
"""
