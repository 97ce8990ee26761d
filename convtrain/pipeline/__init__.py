"""One command start to finish, what the CLI calls: fit, resume, evaluate, predict, info."""
