"""Data prep benchmark: our pipeline against the tokenizer's own limit and the usual datasets + TRL recipe.

    python bench/prep.py                     # generated instruction data (150k examples), context 2048
    python bench/prep.py --data big.jsonl    # a given prompt/response JSONL file instead
    python bench/prep.py --sides ours        # only our pipeline (e.g. peak memory on a 1 GB file)
    python bench/prep.py --make-data 1GB --out big.jsonl   # write generated data of about that size

Three sides, each in a fresh subprocess so its peak RSS is its own (L runs first and again last, and
its fastest pass counts, so that a busy moment on the machine does not lower the limit):
  L     the limit: the tokenizer's own batch encoding over the same prompt and response texts, read into
        memory beforehand (not timed): no parsing, validation, masking, packing or writing. Both
        `encode_batch` and `encode_batch_fast` (no offsets) are timed; L is the faster.
  P     the usual recipe: datasets.load_dataset("json") -> batched map tokenizing prompt and response with a
        completion mask -> trl.pack_dataset(strategy="bfd") -> save_to_disk.
  ours  tasks.prepare.stage.prepare, the pipeline's own entry point: read -> validate -> tokenize with loss masks
        -> pack -> rows on disk (including hashing the input for the cache key).
P and ours are timed from the JSONL file to data on disk, their libraries imported beforehand (a cost a
process pays once). tokens/s divides every token of every example (prompt with special tokens, response,
EOS; before truncation) by the side's wall time.
The last line is the summary: `prep ours/L=<x> ours/P=<y> fill=<z> peak_rss_mb=<n>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONTEXT_LENGTH = 2048
VOCAB_SIZE = 32_000
EOS = "<|endoftext|>"

# --- a realistic instruction dataset, generated deterministically ------------------------------------

COMMON = """the of and to a in is it you that he was for on are with as I his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which do their time if will way
about many then them write would like so these her long make thing see him two has look more day could go come did number
sound no most people my over know water than call first who may down side been now find any new work part take get place
made live where after back little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high such follow act why
ask men change went light kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food sun four between state keep
eye never last let thought city tree cross farm hard start might story saw far sea draw left late run while press close
night real life few north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend began idea fish
mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door product black short numeral class wind
question happen complete ship area half rock order fire south problem piece told knew pass since top whole king space heard
best hour better true during hundred five remember step early hold west ground interest reach fast verb sing listen six
table travel less morning ten simple several vowel toward war lay against pattern slow center love person money serve appear
road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan
figure star box noun field rest correct able pound done beauty drive stood contain front teach week final gave green quick
develop ocean warm free minute strong special mind behind clear tail produce fact street inch multiply nothing course stay
wheel full force blue object decide surface deep moon island foot system busy test record boat common gold possible plane
dry wonder laugh thousand ago ran check game shape hot miss brought heat snow tire bring yes distant fill east paint language
among model data training loss token function value return file error server request response user query column schema
cluster memory process thread network latency throughput batch gradient layer weight tensor""".split()
SYLLABLES = "ka ri to mel an dor sen vi lo qua tes ra ne pi sto gra ver li mon tal cor ex pa de in un bi ter ol za fen hy dro".split()
PUNCT = [".", ".", ".", "?", "!", ":"]
TASKS = [
    "Summarize the following text.", "Explain the main idea in plain words.", "Answer the question below.",
    "Rewrite this paragraph so it is easier to read.", "Write a Python function for the task described.",
    "List the key points of this passage.", "Translate the note into formal English.", "Give three examples of",
]


class TextGen:
    """Zipf-distributed words (common English, then a long tail of rarer made-up words), sentences, paragraphs,
    bullet lists and code; prompt and response lengths log-normal, so lengths vary over two orders of magnitude."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        rare = {"".join(self.rng.choice(SYLLABLES, size=self.rng.integers(2, 5))) for _ in range(40_000)}
        self.words = np.array(COMMON + sorted(rare - set(COMMON)), dtype=object)
        weights = 1.0 / np.arange(1, len(self.words) + 1) ** 1.05
        self.cdf = np.cumsum(weights / weights.sum())

    def draw(self, n: int) -> list[str]:
        return self.words[np.searchsorted(self.cdf, self.rng.random(n))].tolist()

    def prose(self, n_words: int) -> str:
        words, r = self.draw(n_words), self.rng
        cuts = np.cumsum(r.integers(4, 24, size=n_words // 4 + 1))
        cuts = cuts[cuts < n_words].tolist()
        coins, numbers = r.random((len(cuts) + 1, 4)).tolist(), r.integers(0, 5000, size=len(cuts) + 1).tolist()
        out = []
        for j, (a, b) in enumerate(zip([0] + cuts, cuts + [n_words])):
            s = words[a:b]
            s[0] = s[0].capitalize()
            if coins[j][0] < 0.2:
                s.append(str(numbers[j]))
            if len(s) > 6 and coins[j][1] < 0.4:
                s[3] += ","
            out.append(" ".join(s) + PUNCT[int(coins[j][2] * len(PUNCT))] + ("\n\n" if coins[j][3] < 0.15 else " "))
        return "".join(out).strip()

    def code(self, n_lines: int) -> str:
        names = self.draw(3 * n_lines + 3)
        lines = [f"def {names[0]}_{names[1]}({names[2]}, options=None):"]
        for j in range(1, n_lines + 1):
            a, b, c = names[3 * j: 3 * j + 3]
            lines.append([f"    {a} = {b}.get('{c}', {j})", f"    for {a} in {b}:", f"        {c}.append({a} * {j + 1})",
                          f"    if {a} > {b}:", f"        return {c}", f"    # {a} {b} {c}"][int(self.rng.integers(6))])
        return "```python\n" + "\n".join(lines) + "\n```"

    def example(self) -> dict:
        r = self.rng
        prompt = TASKS[int(r.integers(len(TASKS)))]
        context = int(min(1200, r.lognormal(3.6, 1.0)))
        if context > 5:
            prompt += "\n\n" + self.prose(context)
        n = int(min(1400, r.lognormal(4.6, 0.8)))
        response = self.code(max(3, n // 8)) if r.random() < 0.15 else self.prose(max(3, n))
        if r.random() < 0.2:
            bullets = "\n".join(f"- {self.prose(int(r.integers(5, 20)))}" for _ in range(int(r.integers(2, 7))))
            response = bullets + "\n\n" + response
        return {"prompt": prompt, "response": response}


def write_dataset(path: Path, examples: int | None = None, size_bytes: int | None = None, seed: int = 0) -> Path:
    """Generated prompt/response JSONL: a number of examples, or examples until about size_bytes."""
    gen = TextGen(seed)
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w") as f:
        for i in range(examples or sys.maxsize):
            if size_bytes is not None and written >= size_bytes:
                break
            written += f.write(json.dumps(gen.example()) + "\n")
    tmp.rename(path)
    return path


def build_model_dir(data: Path, out: Path, context_length: int, sample: int = 20_000) -> Path:
    """A 32k byte-level BPE trained on the first records of the data, saved as a transformers tokenizer
    beside a Llama config (the pipeline reads the context length from it; no weights are needed to prepare data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    def texts():
        with open(data) as f:
            for _, line in zip(range(sample), f):
                record = json.loads(line)
                yield record["prompt"]
                yield record.get("response", record.get("completion", ""))

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS, model_max_length=context_length)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    tokenizer.save_pretrained(tmp)
    LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=context_length, eos_token_id=tokenizer.eos_token_id).save_pretrained(tmp)
    tmp.rename(out)
    return out


# --- the three sides, each run in its own process --------------------------------------------------------


def import_before_the_clock(model: Path) -> None:
    """The modules both P and ours use, imported untimed: a process pays for them once, not per dataset
    (P's `import trl` loads most of them anyway; AutoTokenizer reads the model's config, which loads the rest)."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoConfig

    AutoConfig.from_pretrained(model)


def side_limit(data: Path, model: Path, context_length: int, encoders: str = "encode_batch,encode_batch_fast") -> dict:
    """The named batch encoders (encode_batch_fast skips offsets), one pass each: the limit is the fastest."""
    from transformers import AutoTokenizer

    rust = AutoTokenizer.from_pretrained(model).backend_tokenizer
    prompts, responses = [], []
    with open(data) as f:
        for line in f:
            record = json.loads(line)
            prompts.append(record["prompt"])
            responses.append(record.get("response", record.get("completion")))
    result = {}
    for encode in (getattr(rust, name) for name in encoders.split(",")):
        tokens, start = len(responses), time.perf_counter()  # one EOS per example
        for i in range(0, len(prompts), 2048):
            tokens += sum(len(e) for e in encode(prompts[i: i + 2048]))
            tokens += sum(len(e) for e in encode(responses[i: i + 2048], add_special_tokens=False))
        result[encode.__name__] = time.perf_counter() - start
    return {"seconds": min(result.values()), "tokens": tokens, "detail": {k: f"{tokens / v:,.0f} tok/s" for k, v in result.items()}}


def side_recipe(data: Path, model: Path, context_length: int, work: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import pack_dataset

    datasets.disable_progress_bars()
    import_before_the_clock(model)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model)
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf-cache"))
    answer = "response" if "response" in ds.column_names else "completion"
    in_tokenizer = 0.0  # how much of P is the tokenizer itself: no pipeline around it can beat that

    def tokenize(batch):
        nonlocal in_tokenizer
        t = time.perf_counter()
        prompts = tokenizer(batch["prompt"])["input_ids"]
        responses = tokenizer(batch[answer], add_special_tokens=False)["input_ids"]
        in_tokenizer += time.perf_counter() - t
        return {
            "input_ids": [p + r + [tokenizer.eos_token_id] for p, r in zip(prompts, responses)],
            "completion_mask": [[0] * len(p) + [1] * (len(r) + 1) for p, r in zip(prompts, responses)],
        }

    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    packed = pack_dataset(ds, seq_length=context_length, strategy="bfd")
    packed.save_to_disk(str(work / "recipe-out"))
    seconds = time.perf_counter() - start

    import pyarrow.compute as pc

    length = lambda d: pc.sum(pc.list_value_length(d.data.column("input_ids"))).as_py()  # noqa: E731
    return {
        "seconds": seconds, "tokens": length(ds), "fill": length(packed) / (len(packed) * context_length), "rows": len(packed),
        "detail": {"in the tokenizer": f"{in_tokenizer:.1f} s of {seconds:.1f} s"},
    }


def side_ours(data: Path, model: Path, context_length: int, work: Path) -> dict:
    os.environ["TESSERA_HOME"] = str(work / "tessera-home")
    from tasks.prepare.stage import prepare
    from tessera.core.config import build_run_config

    import_before_the_clock(model)

    config = build_run_config(
        model=str(model), train_data_path=str(data), register_to="main.bench",
        task_type="INSTRUCTION_FINETUNE", context_length=context_length,
    )
    start = time.perf_counter()
    prepared = prepare(config)
    seconds = time.perf_counter() - start
    s = prepared.stats
    return {"seconds": seconds, "tokens": round(s.length_mean * s.examples), "fill": s.fill, "rows": s.rows, "truncated": s.truncated}


def run_side(name: str, data: Path, model: Path, context_length: int, work: Path, *extra: str) -> dict:
    """Run one side in a fresh interpreter; it prints its result as JSON on its last line."""
    side_work = work / f"side-{name}"
    shutil.rmtree(side_work, ignore_errors=True)
    side_work.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("TOKENIZERS_PARALLELISM", None)  # L and P: the tokenizer's own thread pool, as users run them
    if name == "ours":
        env["TOKENIZERS_PARALLELISM"] = "false"  # as the SDK and CLI set it: our pipeline brings its own threads
    cmd = [sys.executable, __file__, "--side", name, "--data", str(data), "--model", str(model),
           "--context-length", str(context_length), "--work", str(side_work), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"side {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    shutil.rmtree(side_work, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(args) -> None:
    fn = {"L": side_limit, "P": side_recipe, "ours": side_ours}[args.side]
    extra = (args.encoders,) if args.side == "L" else (args.work,)
    result = fn(args.data, args.model, args.context_length, *extra)
    rss_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({**result, "peak_rss_mb": round(rss_kb / 1024)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="prompt/response JSONL (default: generated)")
    ap.add_argument("--examples", type=int, default=150_000, help="generated examples (default 150000)")
    ap.add_argument("--context-length", type=int, default=CONTEXT_LENGTH)
    ap.add_argument("--sides", default="L,P,ours", help="comma-separated, of L, P, ours")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tessera-bench-prep",
                    help="keeps the generated data and tokenizer between runs")
    ap.add_argument("--make-data", help="only write generated data of about this size (e.g. 1GB, 300MB) to --out")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--side", choices=["L", "P", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--encoders", default="encode_batch,encode_batch_fast", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)
    if args.make_data:
        units = {"GB": 1 << 30, "MB": 1 << 20}
        size = int(float(args.make_data[:-2]) * units[args.make_data[-2:].upper()])
        print(write_dataset(args.out, size_bytes=size))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = args.data.resolve() if args.data else args.work / f"instruct-{args.examples}.jsonl"
    if not data.exists():
        print(f"generating {args.examples} examples -> {data}", flush=True)
        write_dataset(data, examples=args.examples)
    stat = data.stat()
    model = args.work / f"model-{data.stem}-{stat.st_size}-{int(stat.st_mtime)}-{args.context_length}"
    if not model.exists():
        print(f"training a {VOCAB_SIZE}-token byte-level BPE on {data.name} -> {model}", flush=True)
        build_model_dir(data, model, args.context_length)
    print(f"data {data} ({stat.st_size / 1e6:.0f} MB), context {args.context_length}, {os.cpu_count()} cores", flush=True)

    results = {}
    sides = args.sides.split(",")
    again = [("L", "--encoders", "encode_batch_fast")] if "L" in sides and len(sides) > 1 else []
    for name, *extra in [(n,) for n in sides] + again:  # L once more at the end: the limit is its best run
        load = os.getloadavg()[0]  # other work on the machine skews a side: shown so a reader can tell
        r = run_side(name, data, model, args.context_length, args.work, *extra)
        r["tok_s"] = r["tokens"] / r["seconds"]
        if name not in results or r["tok_s"] > results[name]["tok_s"]:
            results[name] = r
        fill = f"fill {r['fill']:.4f} ({r['rows']} rows)  " if "fill" in r else ""
        detail = ", ".join(f"{k} {v}" for k, v in r.get("detail", {}).items())
        print(f"{name:>4}: {r['tok_s']:>11,.0f} tok/s  {r['seconds']:6.1f} s (load before {load:.1f})  "
              f"{r['tokens']:,} tokens  peak RSS {r['peak_rss_mb']:,} MB  {fill}{detail}", flush=True)

    ours = results.get("ours", {})
    ratio = lambda other: f"{ours['tok_s'] / results[other]['tok_s']:.2f}" if ours and other in results else "n/a"  # noqa: E731
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    print(f"prep ours/L={ratio('L')} ours/P={ratio('P')} fill={ours.get('fill', float('nan')):.4f} "
          f"peak_rss_mb={ours.get('peak_rss_mb', 'n/a')}")


if __name__ == "__main__":
    main()
