"""Clients of the Transformer² server: the SDK helper (t2client), the chat REPL and the load generator."""

from clients.t2client import StreamResult, T2Client, T2Report, parse_mix, report, t2_options

__all__ = ["T2Client", "T2Report", "StreamResult", "report", "t2_options", "parse_mix"]
