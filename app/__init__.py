"""The app shell: the dsched command, the process runner, backend selection. Above the services."""
