"""Model hyper-parameters, named as in the reference Whisper checkpoints (``ckpt["dims"]``)."""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int  # mel bins of the input features (80, or 128 for large-v3)
    n_audio_ctx: int  # encoder positions (1500 for a 30 s window)
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int  # text vocabulary, timestamp tokens included
    n_text_ctx: int  # decoder positions (448)
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_multilingual(self) -> bool:
        return self.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        # 51865 (99 languages) up to large-v2; large-v3 adds Cantonese (100).
        return self.n_vocab - 51765 - int(self.is_multilingual)
