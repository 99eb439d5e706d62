"""The HTTP side of the sidecar: aiohttp app, WebSocket events, metrics, `serve`."""
