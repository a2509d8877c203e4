"""The request and response protocols both front ends speak, with no HTTP in them: the HTTP server
(`entrypoint.http`) and DJL Serving's `handle()` (`entrypoint.djl_handler`) use them alike.

`prepare.prepare` turns a request body into engine requests (parsing, fan-out, ids, seeds, the admission
bound and the prompt-length check); `lmi` and `openai` are the two request schemas, `validation` what they
share (the JSON body, strict types, ignored fields, messages naming the field); `tokenization` tokenizes
prompts off the event loop; `schema` holds the pydantic response models that build every response body
(and that /openapi.json documents); `lmi` / `streaming` and `openai_response` turn engine outputs into
those bodies and stream chunks; `errors` is the one table from failures to statuses and error bodies.
"""
