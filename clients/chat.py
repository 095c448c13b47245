"""`t2 chat`: an interactive chat with a Transformer² server, streaming, with the dispatch shown per answer.

Contract: reads lines from `stdin` (a terminal or a pipe), keeps the conversation, streams each answer to
`stdout` and prints the `t2` report (strategy, label, mix, first-pass and patch times) after it. Slash
commands change the adaptation for the next turns:
  /expert NAME   one expert            /mix a=0.7,b=0.3   a blend          /dispatch prompt|classifier|none
  /auto          back to the server's default dispatch    /experts         list the server's experts
  /reset         forget the conversation                  /quit (or EOF)   leave
Server errors are printed as one line and the session goes on.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import openai

from clients.t2client import StreamResult, T2Client, parse_mix

HELP = ("commands: /expert NAME | /mix a=0.7,b=0.3 | /dispatch prompt|classifier|none | /auto | /experts | "
        "/reset | /quit")


def run_chat(client: T2Client, *, model: str = "auto", system: str | None = None, max_tokens: int = 256,
             temperature: float = 0.7, expert: str | None = None, experts: dict[str, float] | None = None,
             dispatch: str | None = None, show_report: bool = True,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The REPL; returns the process exit code."""
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    choice: dict[str, Any] = dict(expert=expert, experts=experts, dispatch=dispatch)
    interactive = stdin.isatty()

    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    say(f"t2 chat on {client.openai.base_url} ({model}); {HELP}")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        # 1. slash commands
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                history = history[:1] if system else []
                say("(conversation cleared)")
            elif cmd == "/expert" and arg:
                choice = dict(expert=arg, experts=None, dispatch=None)
                say(f"(expert {arg})")
            elif cmd == "/mix" and arg:
                try:
                    choice = dict(expert=None, experts=parse_mix(arg), dispatch=None)
                    say(f"(mix {choice['experts']})")
                except ValueError as e:
                    say(f"error: {e}")
            elif cmd == "/dispatch" and arg:
                choice = dict(expert=None, experts=None, dispatch=arg)
                say(f"(dispatch {arg})")
            elif cmd == "/auto":
                choice = dict(expert=None, experts=None, dispatch=None)
                say("(server default dispatch)")
            elif cmd == "/experts":
                for name, info in sorted(client.experts().items()):
                    say(f"  {name:16s} {info.get('label', ''):11s} {info.get('description', '')}")
            else:
                say(HELP)
            continue
        # 2. one turn: stream the answer, then the report
        history.append({"role": "user", "content": line})
        result = StreamResult()
        try:
            for piece in client.stream_chat(history, result=result, model=model, max_tokens=max_tokens,
                                            temperature=temperature, **choice):
                stdout.write(piece)
                stdout.flush()
        except (openai.APIError, ValueError) as e:
            history.pop()
            say(f"\nerror: {getattr(e, 'message', None) or e}")
            continue
        say("")
        history.append({"role": "assistant", "content": result.text})
        if show_report and result.report:
            say(result.report.summary())
