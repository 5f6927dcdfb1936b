"""`make faults` and `make soak`: the system run as `make up` runs it (`python -m stack.up`), on
private Redis servers (cache and broker apart) and a database of its own, under load, while a
fault is injected; then every written entity and list is read through every API process and
compared with the database. Results go to RELIABILITY.md."""
