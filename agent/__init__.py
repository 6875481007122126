"""optout-agent: press 9 to stop these calls, on Asterisk, instantly and provably."""

__version__ = "0.1.0"
