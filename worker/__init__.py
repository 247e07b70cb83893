"""stream-counter: exactly-once counters from a Redis Stream under a fenced lock."""

__version__ = "0.1.0"
