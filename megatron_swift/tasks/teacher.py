"""GKD's teacher: a frozen HF checkpoint (any supported family) on megatron-core, under the student's layout
or on a tensor-parallel size of its own (task.teacher.tp; tasks/teacher_logits.py brings its logits to the
student's vocabulary shards), and the check that teacher and student share a tokenizer (the divergence
compares distributions over the same token ids, shard by shard)."""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional

PROBE = "Teacher and student: 12 + 30 = 42.\n<|im_start|>user\nÜber café 東京</s>"


def tokenizer_problem(cfg) -> Optional[str]:
    """One line if the teacher's tokenizer is not the student's (or cannot be read), else None."""
    from megatron_swift.data.tokenizer import build_tokenizer

    teacher = cfg.task.teacher
    student_spec = cfg.data.tokenizer or cfg.model.pretrained or "byte"
    teacher_spec = teacher.tokenizer or teacher.model
    try:
        mine, theirs = build_tokenizer(student_spec), build_tokenizer(teacher_spec)
    except Exception as e:  # noqa: BLE001 - any reader's error is reported as one line naming the key
        return (f"task.teacher.tokenizer={teacher_spec}: cannot read the teacher's tokenizer ({e}); set "
                "task.teacher.tokenizer to the tokenizer the teacher was trained with")
    same = mine.vocab_size == theirs.vocab_size and \
        mine.encode_with_offsets(PROBE)[0] == theirs.encode_with_offsets(PROBE)[0]
    if not same:
        return (f"task.teacher.model={teacher.model}: the teacher's tokenizer ({teacher_spec}, {theirs.vocab_size} "
                f"tokens) is not the student's ({student_spec}, {mine.vocab_size} tokens); GKD needs one tokenizer")
    return None


def build_teacher(cfg, backend, arch, padded_vocab: int):
    """(frozen teacher chunks, their layout, their padded vocabulary). On the student's layout (task.teacher.tp
    unset or parallel.tp) the layout is None and the vocabulary padded as the student's (the same shards);
    otherwise the teacher gets process groups of its own (backend/layouts.py) and is padded for its TP size."""
    from megatron_swift.config.errors import ConfigError
    from megatron_swift.models.arch import padded_vocab_size
    from megatron_swift.models.frozen import arch_from_folder, build_frozen, layout_for

    folder = cfg.task.teacher.model
    teacher_arch = arch_from_folder(folder)
    if (teacher_arch.vocab_size or arch.vocab_size) != arch.vocab_size:
        raise ConfigError([f"task.teacher.model={folder}: vocab_size {teacher_arch.vocab_size} in its config.json "
                           f"is not the student's {arch.vocab_size}; GKD needs one vocabulary"])
    teacher_arch = dataclasses.replace(teacher_arch, vocab_size=arch.vocab_size, head="lm")
    layout = layout_for(cfg.task.teacher.tp, cfg.parallel.tp, cfg.cluster.dist_timeout_minutes)
    if layout is not None:
        padded_vocab = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, layout.tp)
    chunks = build_frozen(cfg, backend, teacher_arch, folder, padded_vocab, cfg.train.seq_length, layout)
    return chunks, layout, padded_vocab


def teacher_folder_problem(folder: Optional[str]) -> Optional[str]:
    if not folder:
        return ("task=gkd needs a teacher: set task.teacher.model=<HF folder> (a checkpoint with the student's "
                "tokenizer)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return f"task.teacher.model={folder}: not a Hugging Face checkpoint folder (no config.json)"
    return None


def teacher_layout_problems(cfg) -> List[str]:
    """The teacher's tensor-parallel size: its heads split evenly; another size than the student's runs over
    the same ranks with data-parallel rows only (parallel.pp=1) and writes no completions (no seq_kd)."""
    from megatron_swift.data.errors import DataError
    from megatron_swift.models.frozen import arch_from_folder

    tp, par, problems = cfg.task.teacher.tp, cfg.parallel, []
    try:
        arch = arch_from_folder(cfg.task.teacher.model)
    except (DataError, ValueError, KeyError) as e:
        return [f"task.teacher.model={cfg.task.teacher.model}: cannot read its architecture ({e})"]
    size = tp or par.tp
    if arch.num_attention_heads % size or arch.num_query_groups % size:
        problems.append(f"task.teacher.tp={size}: the teacher's {arch.num_attention_heads} attention heads and "
                        f"{arch.num_query_groups} key-value heads must divide by its tensor-parallel size; set "
                        "task.teacher.tp to a divisor of both")
    if tp in (None, par.tp):
        return problems
    world = int(os.environ.get("WORLD_SIZE", tp))  # set by torchrun; the planner has no ranks to count
    if tp < 1 or world % tp:
        problems.append(f"task.teacher.tp={tp} must divide the number of ranks ({world})")
    if par.pp > 1:
        problems.append(f"task.teacher.tp={tp} differs from parallel.tp={par.tp}: a teacher on its own layout "
                        "needs parallel.pp=1 (leave task.teacher.tp out to run it on the student's layout)")
    if cfg.task.seq_kd:
        problems.append(f"task.teacher.tp={tp} differs from parallel.tp={par.tp}: task.seq_kd (the teacher "
                        "writing completions) runs the teacher on the student's layout; leave task.teacher.tp out")
    return problems
