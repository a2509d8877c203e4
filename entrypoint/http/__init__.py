"""The HTTP front end: LMI's /ping, /invocations, /predictions/{model} and /models, and OpenAI's /v1 routes, on
FastAPI + uvicorn.

`app.create_app` builds the app; `state.ServerState` is what it serves (loading, ready, failed); `predict`
and `openai_api` are the generation routes, which read the body and hand it to `entrypoint.protocol`
(request schemas, preparation, response bodies, the error table); `generation` collects or streams the
outputs and renders failures; `api_schema` assembles the OpenAPI document from the protocol's models.
"""
