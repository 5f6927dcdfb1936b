"""Local process tooling: a private redis-server (tests, `make up`) and the `make up` supervisor."""
