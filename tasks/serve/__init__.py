"""Stage: serve. A BentoML service with OpenAI's API over a registered model version.

    bentoml serve tasks.serve.service:ChatService   (TESSERA_MODEL_URI=models:/<name>/<version> or models:/<name>@<alias>)

- service.py: the BentoML service and its routes.
- engine.py: the batching engine the service generates with.
- api.py: the OpenAI request and reply shapes.
- loading.py: the registered model and tokenizer, on the device they will run on.
- settings.py: ServeSettings (an endpoint's limits and KV cache) and the checks of a request.
- model_server.py: starting and stopping one `bentoml serve` as a child process.
- endpoints/: named endpoints, one URL whose version can be replaced without a failed request (records, processes,
  backends, status, lifecycle).
- router.py: an endpoint's router process (`python -m tasks.serve.router`).
- bento.py: a Bento with one registered model version inside it (`python -m tasks.serve.bento`).
- stage.py: the deploy Prefect tasks the flows call.
"""
