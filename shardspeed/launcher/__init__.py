"""The ``shardspeed`` launcher: start N ranks of a script, supervise them, end the job together."""
