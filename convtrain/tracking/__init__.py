"""MLflow: the store (URI, client, experiments), run tags and orphaned runs, the logging
callback, the pyfunc model, and the `convtrain ui` server. mlflow is imported lazily."""
