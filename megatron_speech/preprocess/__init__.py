"""Audio files → 16 kHz int16 megatron-core IndexedDataset shards + manifests + a rejects report
(docs/design.md §2, §11).

    summary = preprocess("wavs/", "data/corpus", workers=16)    # tools/preprocess_audio.py is the CLI
    print(summary.format())

Inputs, told apart by their content, never by a guess (the kind is part of the journal's fingerprint):
  "directory"  a folder, walked recursively, symlinks followed; every regular file is tried as audio whatever its
               name, and what does not decode is a reject. A folder holding LibriSpeech, Multilingual LibriSpeech or
               CommonVoice metadata ("librispeech", "mls", "commonvoice", joined by "+" when several) is walked the
               same way, and its transcripts add labels and corpus ids (megatron_speech/data/importers.py).
  "jsonl"      a file whose first line starts with "{": one object per line, "path" (relative to the manifest's
               folder) plus any labels, copied to the output; an "id" key names the utterance.
  "tsv"        a fairseq TSV manifest: line 1 an existing folder (the root; relative to the manifest's folder) with
               no tab, line 2 `relpath<TAB>frames`; its sidecar label files `STEM.wrd`, `STEM.phn`, `STEM.ltr` (one
               line per audio line, fairseq's layout) become the labels "text", "phonemes", "ltr".
  "table"      a CSV/TSV whose header names the audio column ("path", "audio", "file_name", ...: importers.py); the
               other columns become labels. "commonvoice": a CommonVoice *.tsv (client_id, path, sentence, ...; the
               audio in clips/ next to it); sentence, client_id, locale become "text", "speaker", "language".
Anything else is a ValueError naming the file, its first line and these layouts. A folder is processed in sorted
relative-path order (then the transcript lines whose audio is missing, as rejects), a manifest in line order.

Per file (in a worker process): decode with soundfile (libsndfile) as float32, check the header against what decodes,
mix to mono (mean of the channels), resample to 16 kHz with soxr at quality "HQ" (libsoxr's 20-bit preset: already
finer than the int16 output; "VHQ" cost 1-5x the time here for nothing left after rounding), round to int16
(x * 32768, round half to even, clip). Files that are already 16 kHz are not resampled.

Outputs, for PREFIX = out/corpus (shard names relative to the manifests' folder):
  out/corpus_train_00000.{bin,idx} ...   megatron-core IndexedDataset, dtype int16, one sequence and one document per
  out/corpus_valid_00000.{bin,idx} ...   utterance; a shard is closed before it would pass shard_size_gb * 1e9 bytes
                                         of .bin (a longer single utterance gets a shard of its own)
  out/corpus_{train,valid}.manifest.jsonl  one object per utterance, in shard order:
      "shard" (e.g. "corpus_train_00000"), "index" (its position in that shard), "id", "source" (absolute input
      path), "samples" (at 16 kHz), "orig_sample_rate", "orig_channels", "audio_hash" (blake2b-128 hex of the
      stored int16 little-endian bytes),
      "warnings" (list, usually empty: "clipped" = a run of >= 3 samples at >= 99.9% of full scale in the input,
      "overshoot" = resampling rang past full scale and samples were clipped to int16), then for a segment of a
      longer recording "parent" (the input's id) and "offset" (its first sample in the input's 16 kHz audio), then
      the input's labels.
  out/corpus.rejects.jsonl   one object per rejected input (or segment): "source", "reason" (REJECT_REASONS),
                             "detail", "id" (and a segment's "parent", "offset").
  out/corpus.preprocess.json the run's journal: arguments, fingerprint, progress; "complete": true once done.
  out/corpus_{train,valid}.index  the binary utterance index of each manifest (data/index.py), written last: what
                             the trainer memory-maps instead of parsing the manifest.
Both manifests and the rejects file always exist at the end (possibly empty). Every input (every segment of a cut
one) lands in exactly one of them. The split is by a hash of (seed, id): an utterance stays in the same split when
inputs are added or reordered; a segment goes by its parent's id, so valid never shares a recording with train.

Long recordings (max_segment_seconds, default 30; 0 = never cut): an unlabeled input longer than that is cut at
low-energy points into segments of at most max_segment_seconds and at least min_seconds (megatron_speech/data/
segment.py has the rule), each a manifest row of its own with id "{parent}@{offset}" (e.g. "talks/a.flac@472200";
stable: the cuts depend on the audio alone; unique: two parents never give the same id, and a segment whose id is
also some input's id is rejected as "duplicate_id"). The segments' samples add up to the input's, in order. "Unlabeled":
the input has no label other than "language"; a transcript, phonemes, a speaker or any other key describes the
whole file, so such an input is never cut. Duplicates are found per segment (a duplicate segment is rejected,
its siblings kept). Cutting runs in the workers; the unit of progress stays the input file.

Parts (`part=(i, n)`, the CLI's --part I/N; a Slurm array runs one per task: launch/preprocess.sbatch): the run
takes the inputs whose id hashes to i modulo n (blake2b, independent of the split's hash) and writes PREFIX_partIIII
(4 digits) with its own journal. By id hash, not contiguous ranges: parts balance in hours even when a language's
files are all long, and adding inputs changes only the parts they fall in (the others stay complete). The split,
the segments and each kept utterance's bytes do not depend on n; duplicates are found within a part only (an input
and its copy in another part are both kept). Train on all parts with data.prefix='PREFIX_part*'.

Truncation policy: a file whose header declares more audio than the file holds (a WAV/AIFF/W64 data chunk longer than
the file, an RF64 ds64 data size above what is there, fewer frames decodable than the header states) is rejected as
"truncated", never kept in part, whatever its format: it is nearly always an interrupted copy, its labels (text,
phonemes) describe audio that is missing, and the fix is to copy it again. A streamed WAV (data size 0xFFFFFFFF) is not
truncated. MP3 frame counts are estimates (exact only with a Xing/LAME header), so MP3 is truncated only when more than
1% + 2 MPEG frames are missing. A decoder error part-way (e.g. a FLAC cut mid-frame: "lost sync") is "decode_error".
libsndfile reports a cut Ogg as either malformed ("unreadable") or as holding 0 frames ("empty", with its byte size in
the detail): it cannot be told from an empty one. A WAV whose header says 0 data bytes is "empty" too.
Duplicates are found by the first 64 bits of audio_hash (a false match has odds ~n^2 / 2^65 for n kept utterances).

Resume: the journal is rewritten atomically (temp file + rename) after every closed shard (after the input, when a
shard closes between two segments of one) and every `checkpoint_seconds`, always at an input boundary, recording
the inputs done, each split's closed shards (name, items, bytes), the open shard's
item count and bytes, and the byte length of every manifest/rejects file. Shards are written as `*.bin.partial` and
renamed when closed; manifests and rejects are `*.partial` until the end. A rerun of the same command (same inputs with
the same sizes and mtimes, same output-affecting arguments, same library versions; --workers may change) truncates the
files to the journal, rebuilds the open shard from its bytes (checked against each utterance's audio_hash) and goes on:
the result is byte-identical to an uninterrupted run (tested on one machine; soxr's output could differ on
another CPU type, which the fingerprint cannot see; the cut points are exact integer arithmetic). A rerun with
changed arguments or inputs is refused. SIGINT, SIGTERM or SIGUSR1 (Slurm's warning signal) stops at the next file
boundary, saves a checkpoint and raises PreprocessInterrupted.

Memory: the input list (~0.5 KB per input) and the duplicate detector (~110 bytes per kept utterance) live in the
main process; split very large corpora into several prefixes or parts (data.prefix takes several, and globs).
"""

from megatron_speech.data.audio_io import REJECT_REASONS, Kept, Rejected, _audio_hash, decode_file
from megatron_speech.data.inputs import OUTPUT_KEYS, InputItem, list_inputs
from megatron_speech.data.parts import SPLITS, is_valid, part_of, part_prefix, parts_status
from megatron_speech.preprocess.run import (
    FORMAT_VERSION,
    SEGMENT_KEYS,
    UNLABELED_KEYS,
    PreprocessInterrupted,
    preprocess,
)
from megatron_speech.preprocess.shards import _builder_class, _Split

__all__ = ["FORMAT_VERSION", "OUTPUT_KEYS", "REJECT_REASONS", "SEGMENT_KEYS", "SPLITS", "UNLABELED_KEYS", "InputItem",
           "Kept", "PreprocessInterrupted", "Rejected", "_Split", "_audio_hash", "_builder_class", "decode_file",
           "is_valid", "list_inputs", "part_of", "part_prefix", "parts_status", "preprocess"]
