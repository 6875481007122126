"""Spoken opt-out: hear the callee say "stop calling me" on ARI calls, in the same pipeline as the key press.

    ARI call -> snoop (spy=in) + external media -> RTP on loopback (listener.py, audio.py)
      -> voice activity, utterances (vad.py) -> recogniser in worker processes (pool.py, model.py)
      -> matcher (matcher.py) -> act: intake.spoken(), origin `speech` | flag: candidates.py
      (clips.py keeps the audio only when configured)

Needs the `speech` extra (`pip install 'optout-agent[speech]'`); runtime.py wires it from Settings and says
clearly when it is asked for but not installed. Nothing here is imported by the agent unless speech is on.
"""
