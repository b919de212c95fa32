"""CTC decoding for `evaluate`: greedy (best path, what validation during training uses) or prefix beam search with
an optional KenLM n-gram word LM, by pyctcdecode (shallow fusion: score = log p_ctc + lm_weight log p_lm +
word_score per word; its alpha and beta; unk_score for words outside the LM, see DecoderSpec).

    decode = build_decoder(task, DecoderSpec("beam", beam_width=100, lm="lm.arpa"))
    tokens = decode(logits [B, F, V], num_frames)       # per utterance: its CTC tokens, blanks and repeats gone

Vocabulary mapping (our labels -> pyctcdecode's): the blank (index 0) is "", asr's word gap "|" is " " (the word
delimiter the LM's words are cut at); other asr labels are single characters, passed as they are, so an LM is
trained on text normalized as tasks/task.py's normalize_text (lower case, letters / digits / apostrophes).
Phonemes are multi-character labels with no word delimiter (the phoneme task drops word gaps): each is passed as
one private-use character and mapped back, so beam search scores phoneme sequences exactly; a word LM has no words
to score there, and --lm with the phoneme task is refused (a phone n-gram would need a delimiter between every
phoneme, which the CTC head does not emit). pyctcdecode and kenlm are imported only when beam search is built.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .task import WORD_GAP, Task

if TYPE_CHECKING:
    import torch

# pyctcdecode's defaults (pyctcdecode/constants.py; a test checks they still match), here so that --help shows
# them without importing it
DEFAULT_BEAM_WIDTH = 100
DEFAULT_LM_WEIGHT = 0.5
DEFAULT_WORD_SCORE = 1.5
DEFAULT_UNK_SCORE = -10.0
PRIVATE_USE = 0xE000  # phoneme i is passed to pyctcdecode as chr(PRIVATE_USE + i)

Decoder = Callable[["torch.Tensor", Sequence[int]], list[list[str]]]


@dataclass(frozen=True)
class DecoderSpec:
    """How evaluate turns CTC outputs into tokens."""

    kind: str = "greedy"
    """"greedy" (best path) or "beam" (prefix beam search, pyctcdecode)."""
    beam_width: int = DEFAULT_BEAM_WIDTH
    """Beam: prefixes kept per frame."""
    lm: str | None = None
    """Beam: a KenLM n-gram word LM (ARPA text or KenLM binary), or None for no LM."""
    lm_weight: float = DEFAULT_LM_WEIGHT
    """Beam with LM: weight of the LM's natural-log probability (pyctcdecode's alpha)."""
    word_score: float = DEFAULT_WORD_SCORE
    """Beam with LM: bonus per decoded word, against the LM's bias to short outputs (pyctcdecode's beta)."""
    unk_score: float = DEFAULT_UNK_SCORE
    """Beam with LM: log score added to a finished word outside the LM's unigrams (scaled by lm_weight) and, while
    the search prunes, to a partial word no unigram starts with (not scaled): pyctcdecode's unk_score_offset. The
    LM thus also acts as a lexicon; 0 turns that off."""
    num_workers: int = 0
    """Beam: processes decoding a batch's utterances in parallel (forked after the decoder is built, as pyctcdecode
    requires; they run numpy only, never the accelerator); 0 = decode in this process."""

    def describe(self) -> str:
        """e.g. `beam (width 100, lm lm.arpa, weight 0.5, word score 1.5)`, as results name the decoder."""
        if self.kind == "greedy":
            return "greedy"
        lm = (f", lm {self.lm}, weight {self.lm_weight}, word score {self.word_score}, unk score {self.unk_score}"
              if self.lm else "")
        return f"beam (width {self.beam_width}{lm})"


def build_decoder(task: Task, spec: DecoderSpec) -> Decoder:
    """A function (logits [B, F, V], real frames per utterance) -> token lists, for a CTC task."""
    if spec.kind == "greedy":
        from .metrics import decode as greedy_decode

        if spec.lm is not None:
            raise ValueError("--lm needs --decoder beam (greedy decoding takes no language model)")
        return lambda logits, num_frames: greedy_decode(task, logits, num_frames)
    if spec.kind != "beam":
        raise ValueError(f"decoder {spec.kind!r}: pick greedy or beam")
    return BeamDecoder(task, spec)


class BeamDecoder:
    """pyctcdecode's beam search over one task's CTC vocabulary (see the module docstring for the mapping)."""

    def __init__(self, task: Task, spec: DecoderSpec) -> None:
        if task.kind != "ctc":
            raise ValueError(f"beam search decodes CTC outputs; task {task.name!r} is a classification")
        if spec.beam_width < 1:
            raise ValueError(f"--beam-width {spec.beam_width}: give at least 1")
        if spec.lm is not None:
            if task.name != "asr":
                raise ValueError(f"--lm: task {task.name!r} emits no word delimiter for a word LM to score; "
                                 "run --decoder beam without --lm (see megatron_speech/tasks/decoding.py)")
            if importlib.util.find_spec("kenlm") is None:
                raise ValueError("--lm needs the kenlm module: pip install 'megatron-speech[lm]'")
            if not os.path.isfile(spec.lm):
                raise FileNotFoundError(f"--lm {spec.lm}: no such file (an ARPA or KenLM binary n-gram LM)")
        import pyctcdecode

        if spec.num_workers < 0:
            raise ValueError(f"--decode-workers {spec.num_workers}: give 0 or more")
        self.task, self.beam_width, self.num_workers, self._pool = task, spec.beam_width, spec.num_workers, None
        if task.name == "asr":
            labels = [" " if label == WORD_GAP else label for label in task.labels]
        else:
            labels = [chr(PRIVATE_USE + i) for i in range(len(task.labels))]
        self._back = {text: label for text, label in zip(labels, task.labels, strict=True)}
        # its alphabet checks warn about a missing " " (phonemes) and log every substitution: not the user's concern
        quiet = logging.getLogger("pyctcdecode.alphabet")
        level, quiet.level = quiet.level, logging.ERROR
        try:
            self._decoder = pyctcdecode.build_ctcdecoder(["", *labels], kenlm_model_path=spec.lm,
                                                         alpha=spec.lm_weight, beta=spec.word_score,
                                                         unk_score_offset=spec.unk_score)
        finally:
            quiet.setLevel(level)

    def __call__(self, logits: torch.Tensor, num_frames: Sequence[int]) -> list[list[str]]:
        import torch

        log_probs = torch.log_softmax(logits.detach().float(), dim=-1).cpu().numpy()  # [B, F, V]
        frames = [int(n) for n in num_frames]
        todo = [b for b, n in enumerate(frames) if n]
        if self.num_workers and self._pool is None:
            import multiprocessing

            self._pool = multiprocessing.get_context("fork").Pool(self.num_workers)
        texts = self._decoder.decode_batch(self._pool, [log_probs[b, :frames[b]] for b in todo],
                                           beam_width=self.beam_width)
        out: list[list[str]] = [[] for _ in frames]
        for b, text in zip(todo, texts, strict=True):
            out[b] = self.tokens(text)
        return out

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def tokens(self, text: str) -> list[str]:
        """pyctcdecode's text -> our tokens (asr: characters with "|" between words)."""
        if self.task.name == "asr":
            return list(text.replace(" ", WORD_GAP))
        return [self._back[c] for c in text]
