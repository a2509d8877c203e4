"""The HTTP front end: LMI's /ping, /invocations, /predictions/{model} and /models, and OpenAI's /v1 routes, on
FastAPI + uvicorn.

`app.create_app` builds the app; `state.ServerState` is what it serves (loading, ready, failed); the LMI
request schema and response bodies are in `lmi_protocol`, OpenAI's in `openai_protocol` and
`openai_response`, what both share (the JSON body, strict types, ignored fields, error messages) in
`validation`, streaming framing in `streaming`, every error's status and body in `errors`, and the OpenAPI
document in `api_schema`.
"""
