"""The HTTP front end: LMI's /ping, /invocations, /predictions/{model} and /models on FastAPI + uvicorn.

`app.create_app` builds the app; `state.ServerState` is what it serves (loading, ready, failed); the
request schema and response bodies are in `lmi_protocol`, streaming framing in `streaming`, and every
error's status and body in `errors`.
"""
