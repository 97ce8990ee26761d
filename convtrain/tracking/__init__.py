"""MLflow: the store (URI, client, experiments), a fit's run (TrackedRun), its metric buffer and
the trainer callback that feeds it, run tags and orphaned runs, the pyfunc model, and the
`convtrain ui` server. mlflow is imported lazily."""
