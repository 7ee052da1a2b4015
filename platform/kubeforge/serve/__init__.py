"""Serving: registered models behind an OpenAI-compatible Ray Serve application (`kubeforge serve`).

`resolve` turns `models:/...` URIs into checked local folders; `app` builds the Ray Serve application
(one vLLM deployment per variant, one router in front). Ray, vLLM and FastAPI are imported only when
an application is built, so importing this package stays cheap.
"""
