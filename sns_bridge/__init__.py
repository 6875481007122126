"""Bridge between Amazon SNS and the opt-out agent."""
