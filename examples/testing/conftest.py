pytest_plugins = ["qdworker.testing.pytest_plugin"]
