"""Stage: serve. A BentoML service with OpenAI's API over a registered model version.

    bentoml serve tasks.serve.service:ChatService   (TESSERA_MODEL_URI=models:/<name>/<version> or models:/<name>@<alias>)

- service.py: the BentoML service and its routes.
- loading.py: the registered model and tokenizer, on the device they will run on.
"""
