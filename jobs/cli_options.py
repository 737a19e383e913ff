"""What the commands that resolve a run config share: the config from ``--config``, ``--set`` and the shortcut flags."""

from __future__ import annotations

import functools

import click

from whisper_batch.pipeline.config import SHORTCUTS, ConfigError, load_config
from whisper_batch.pipeline.secrets import register as register_secrets
from whisper_batch.pipeline.secrets import scrub


def load_cli_config(config: str | None, overrides: tuple[str, ...], shortcuts: dict | None = None):
    """The run config: ``config``, then the ``--set`` overrides, then the shortcut flags given (``{"beam_size": 5}``);
    a flag and a ``--set`` of the key it stands for with different values is a usage error (exit 2)."""
    try:
        cfg = load_config(config, list(overrides), shortcuts or None)
    except (ConfigError, FileNotFoundError) as e:
        message = str(e)
        for name, value in (shortcuts or {}).items():
            if message.startswith(f"{name}=") and " contradicts --set " in message:  # name the flag as typed
                flag = name.replace("_", "-")
                flag = f"--{'' if value else 'no-'}{flag}" if isinstance(value, bool) else f"--{flag} {value}"
                message = flag + message[message.index(" contradicts --set "):]
        raise click.UsageError(scrub(message)) from None
    register_secrets(cfg.storage.storage_options)
    return cfg


# The flags users know from openai-whisper's and faster-whisper's command lines: shortcuts for the --set keys of
# pipeline.config.SHORTCUTS. A flag not given is None, so it leaves the config (file, --set) as it is.
_SHORTCUT_OPTIONS = (
    click.option("--model", "model", default=None, metavar="NAME|PATH|URI",
                 help="Checkpoint: a model name, local path or URI (sets model.name; default: the packaged tiny.en)."),
    click.option("--language", "language", default=None, metavar="CODE",
                 help="Language spoken, e.g. en (sets decode.language; default: detected per file)."),
    click.option("--task", "task", type=click.Choice(["transcribe", "translate"]), default=None,
                 help="translate: into English (sets decode.task; default: transcribe)."),
    click.option("--beam-size", "--beam_size", "beam_size", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Beam search of width N (sets decode.beam_size; default: greedy decoding)."),
    click.option("--word-timestamps/--no-word-timestamps", "word_timestamps", default=None,
                 help="Time every word (sets decode.word_timestamps). openai-whisper's --word_timestamps True|False "
                      "works too."),
    click.option("--word_timestamps", "word_timestamps_value", type=click.BOOL, default=None, hidden=True),
    click.option("--vad/--no-vad", "vad", default=None,
                 help="Send only the speech Silero VAD finds to the model (sets audio.vad; needs silero-vad)."),
)


SET_HELP = ("Config override, e.g. decode.beam_size=5 (repeatable); the flag for the same key, if also given "
            "(--beam-size), must have the same value.")


def shortcut_options(f):
    """Adds the shortcut flags to a command; its callback gets them as one ``shortcuts`` dict of the flags given.

    A flag and a ``--set`` of the key it stands for, with different values, is an error (see
    :func:`load_cli_config`)."""

    @functools.wraps(f)
    def command(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in SHORTCUTS}
        spelled = kwargs.pop("word_timestamps_value")
        if spelled is not None:
            if given["word_timestamps"] not in (None, spelled):
                raise click.UsageError(f"--word_timestamps {spelled} contradicts "
                                       f"--{'' if given['word_timestamps'] else 'no-'}word-timestamps: "
                                       "give one of them")
            given["word_timestamps"] = spelled
        return f(*args, shortcuts={k: v for k, v in given.items() if v is not None}, **kwargs)

    for option in reversed(_SHORTCUT_OPTIONS):
        command = option(command)
    return command
