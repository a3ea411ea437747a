"""MMEB-V2 (VLM2Vec-V2's 78 tasks: 36 image, 18 video, 24 visual-document) read from disk.

`TASKS` lists every scored task with its modality, meta-task, scope and source; `read_task`
turns one task's rows into `TaskData`: its unique queries, its candidate pool (deduplicated by
candidate *name*, the first occurrence winning, as the public code does), each query's own
candidate names (`local` tasks) and its relevant names with their gains.

Layout of `data.mmeb_v2_dir` (the hub's, docs/method.md §7): one folder per Hub dataset
repository, at its Hub id, as `huggingface-cli download --repo-type dataset ID --local-dir
DIR/ID` writes it, read with `datasets.load_dataset(DIR/ID, config, split=split)`:

    DIR/ziyjiang/MMEB_Test_Instruct/           image tasks' annotations (config = task name)
    DIR/VLM2Vec/<Task>/, DIR/lmms-lab/YouCook2/ video tasks' annotations
    DIR/vidore/<name>_beir/, DIR/vidore/<name>_v2/, DIR/openbmb/VisRAG-Ret-Test-<Name>/,
    DIR/VLM2Vec/{ViDoSeek,MMLongBench}-*/      visual documents: configs queries, qrels, corpus
    DIR/TIGER-Lab/MMEB-V2/image-tasks/         MMEB-V1's images (mmeb_v1.tar.gz, extracted)
    DIR/TIGER-Lab/MMEB-V2/video-tasks/frames/<family>/<Task>/<video>/   extracted frames

Pages are read from the corpus' `image` column (bytes, never written out); a video is its frame
folder, which the processor samples to `data.video_frames` frames.

Queries and candidates carry the task instructions of the public code (its
`process_input_text` strings without the `<|image_pad|>`/`<|video_pad|>` prefix: g2e's
prompt places the image or video itself).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

IMAGE_REPO = "ziyjiang/MMEB_Test_Instruct"
# A folder holding only some tasks (g2e.demo.mini_mmeb_v2's) lists them here: {"tasks": [...]}.
MANIFEST = "MMEB_V2_TASKS.json"
ASSETS_REPO = "TIGER-Lab/MMEB-V2"
MODALITIES = ("image", "video", "visdoc")
METRIC = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}


@dataclasses.dataclass(frozen=True)
class Task:
    """One scored task: `scope` 'local' ranks each query's own candidates, 'global' the pool."""

    name: str
    modality: str
    meta_task: str
    scope: str
    repo: str
    config: str | None
    split: str
    parser: str


@dataclasses.dataclass(frozen=True)
class Input:
    """A query or candidate: text and at most one of an image (path or bytes) or a video
    (its frame folder)."""

    text: str
    image: str | bytes | None = None
    video: str | None = None


@dataclasses.dataclass
class TaskData:
    """A task's unique queries, candidate pool and relevance (module docstring)."""

    task: Task
    queries: list[Input]
    pool: dict[str, Input]
    candidates: list[list[str]] | None  # per query, for 'local' tasks
    relevance: list[dict[str, float]]  # per query: candidate name -> gain


def _image_tasks() -> list[Task]:
    meta = {
        "I-CLS": "ImageNet-1K N24News HatefulMemes VOC2007 SUN397 Place365 ImageNet-A "
        "ImageNet-R ObjectNet Country211",
        "I-QA": "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W ScienceQA VizWiz GQA "
        "TextVQA",
        "I-RET": "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA "
        "FashionIQ Wiki-SS-NQ OVEN EDIS",
        "I-VG": "MSCOCO RefCOCO RefCOCO-Matching Visual7W-Pointing",
    }
    return [
        Task(name, "image", meta_task, "local", IMAGE_REPO, name, "test", "image")
        for meta_task, names in meta.items()
        for name in names.split()
    ]


def _video_tasks() -> list[Task]:
    rows = [  # name, meta-task, scope, repo, config, split, parser
        ("Kinetics-700", "V-CLS", "global", "VLM2Vec/Kinetics-700", None, "test", "video_cls"),
        ("SmthSmthV2", "V-CLS", "local", "VLM2Vec/SmthSmthV2", None, "test", "video_cls"),
        ("HMDB51", "V-CLS", "global", "VLM2Vec/HMDB51", None, "test", "video_cls"),
        ("UCF101", "V-CLS", "global", "VLM2Vec/UCF101", None, "test", "video_cls"),
        ("Breakfast", "V-CLS", "global", "VLM2Vec/Breakfast", None, "test", "video_cls"),
        ("MVBench", "V-QA", "local", "VLM2Vec/MVBench", None, "train", "video_qa"),
        ("Video-MME", "V-QA", "local", "VLM2Vec/Video-MME", None, "test", "video_qa"),
        ("NExTQA", "V-QA", "local", "VLM2Vec/NExTQA", "MC", "test", "video_qa"),
        ("EgoSchema", "V-QA", "local", "VLM2Vec/EgoSchema", "Subset", "test", "video_qa"),
        ("ActivityNetQA", "V-QA", "local", "VLM2Vec/ActivityNetQA", None, "test", "video_qa"),
        ("MSR-VTT", "V-RET", "global", "VLM2Vec/MSR-VTT", "test_1k", "test", "video_ret"),
        ("MSVD", "V-RET", "global", "VLM2Vec/MSVD", None, "test", "video_ret"),
        ("DiDeMo", "V-RET", "global", "VLM2Vec/DiDeMo", None, "test", "video_ret"),
        ("VATEX", "V-RET", "global", "VLM2Vec/VATEX", None, "test", "video_ret"),
        ("YouCook2", "V-RET", "global", "lmms-lab/YouCook2", None, "val", "video_ret"),
        ("QVHighlight", "V-MRET", "local", "VLM2Vec/QVHighlight", None, "test", "video_mret"),
        ("Charades-STA", "V-MRET", "local", "VLM2Vec/Charades-STA", None, "test", "video_mret"),
        ("MomentSeeker", "V-MRET", "local", "VLM2Vec/MomentSeeker", None, "test", "moment"),
    ]
    return [Task(n, "video", m, s, r, c, sp, p) for n, m, s, r, c, sp, p in rows]


def _visdoc_tasks() -> list[Task]:
    v1 = {
        "arxivqa": "arxivqa_test_subsampled_beir",
        "docvqa": "docvqa_test_subsampled_beir",
        "infovqa": "infovqa_test_subsampled_beir",
        "tabfquad": "tabfquad_test_subsampled_beir",
        "tatdqa": "tatdqa_test_beir",
        "shiftproject": "shiftproject_test_beir",
        **{
            f"syntheticDocQA_{topic}": f"syntheticDocQA_{topic}_test_beir"
            for topic in (
                "artificial_intelligence",
                "energy",
                "government_reports",
                "healthcare_industry",
            )
        },
    }
    tasks = [
        Task(f"ViDoRe_{n}", "visdoc", "VDR-V1", "global", f"vidore/{repo}", None, "test", "beir")
        for n, repo in v1.items()
    ]
    v2 = ("esg_reports_human_labeled_v2", "biomedical_lectures_v2", "economics_reports_v2")
    v2 += ("esg_reports_v2",)
    for repo in v2:
        name = repo if repo.endswith("labeled_v2") else f"{repo}_multilingual"
        tasks.append(
            Task(
                f"ViDoRe_{name}",
                "visdoc",
                "VDR-V2",
                "global",
                f"vidore/{repo}",
                None,
                "test",
                "beir",
            )
        )
    for name in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA"):
        repo = f"openbmb/VisRAG-Ret-Test-{name}"
        tasks.append(
            Task(f"VisRAG_{name}", "visdoc", "VisRAG", "global", repo, None, "train", "beir")
        )
    for name, repo in (
        ("ViDoSeek-page", "ViDoSeek-page-fixed"),
        ("ViDoSeek-doc", "ViDoSeek"),
        ("MMLongBench-page", "MMLongBench-page-fixed"),
        ("MMLongBench-doc", "MMLongBench-doc"),
    ):
        tasks.append(
            Task(name, "visdoc", "VisDoc-OOD", "global", f"VLM2Vec/{repo}", None, "test", "beir")
        )
    return tasks


TASKS: tuple[Task, ...] = (*_image_tasks(), *_video_tasks(), *_visdoc_tasks())
META_TASKS = tuple(dict.fromkeys(t.meta_task for t in TASKS))


class UnknownTaskError(ValueError):
    """A task name that MMEB-V2's table does not hold."""


def task(name: str) -> Task:
    """The task named `name`. Raises UnknownTaskError naming the choices."""
    for candidate in TASKS:
        if candidate.name == name:
            return candidate
    raise UnknownTaskError(
        f"data.mmeb_v2_tasks: {name!r} is not an MMEB-V2 task; choose from "
        f"{', '.join(t.name for t in TASKS)} (or a modality: {', '.join(MODALITIES)})"
    )


def select_tasks(names: str | Sequence[str], root: str | pathlib.Path | None = None) -> list[Task]:
    """Tasks by name or modality ('image', 'video', 'visdoc'), in table order; empty: the
    tasks `root`'s MANIFEST names when it has one (a generated mini-MMEB-V2), else all 78."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    manifest = pathlib.Path(root) / MANIFEST if root else None
    if not names and manifest is not None and manifest.is_file():
        names = json.loads(manifest.read_text())["tasks"]
    if not names:
        return list(TASKS)
    chosen: dict[str, Task] = {}
    for name in names:
        group = [t for t in TASKS if t.modality == name] if name in MODALITIES else [task(name)]
        chosen.update((t.name, t) for t in group)
    return [t for t in TASKS if t.name in chosen]


# ---------------------------------------------------------------------------------------------
# Reading one task.


def load_split(root: pathlib.Path, repo: str, config: str | None, split: str) -> Any:
    """A split of a local snapshot of a Hub dataset repository, through `datasets` (its rows
    streamed from the files, never from a cache)."""
    import datasets  # noqa: PLC0415 (heavy; only this stage needs it)

    path = root / repo
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no local copy of the Hub dataset {repo}; download it with "
            f"`huggingface-cli download --repo-type dataset {repo} --local-dir {path}`"
        )
    datasets.disable_progress_bars()
    try:
        # Streamed: read from the files each time. The builder's on-disk cache keys a local
        # folder by its repository's name, so two copies (or a copy rewritten in place) would
        # read each other's rows.
        return datasets.load_dataset(str(path), config, split=split, streaming=True)
    except ValueError as error:  # e.g. a config or split the copy does not hold
        raise FileNotFoundError(
            f"{path}: cannot read config {config!r}, split {split!r} of {repo} ({error}); "
            "download the whole repository again"
        ) from error


class Reader:
    """Reads tasks from one MMEB-V2 folder (module docstring); `load` is `load_split`."""

    def __init__(self, root: str | pathlib.Path, load: Callable[..., Any] = load_split):
        self.root = pathlib.Path(root)
        self.load = load
        self.assets = self.root / ASSETS_REPO

    def frames(self, family: str, task: Task, *parts: str) -> str:
        """The frame folder of a video of `task` under the assets' `video-tasks/frames`."""
        return str(self.assets.joinpath("video-tasks", "frames", family, task.name, *parts))

    def read(self, task: Task) -> TaskData:
        """`task`'s queries, pool and relevance. Raises FileNotFoundError for missing files,
        KeyError (naming the column) for rows without the columns the task's parser reads."""
        builder = _Builder(task)
        _PARSERS[task.parser](self, task, builder)
        return builder.finish()

    def rows(self, task: Task, config: str | None = None) -> Iterable[Any]:
        """The rows of `task`'s split (of `config`, default the task's). MVBench's rows are
        its every config's, each row given its config as `subset`."""
        if task.name != "MVBench":
            return self.load(self.root, task.repo, config or task.config, task.split)
        import datasets  # noqa: PLC0415

        names = datasets.get_dataset_config_names(str(self.root / task.repo))
        return (
            dict(row, subset=name)
            for name in names
            for row in self.load(self.root, task.repo, name, task.split)
        )


class _Builder:
    """Collects queries and candidates, deduplicating candidates by name."""

    def __init__(self, task: Task):
        self.task = task
        self.queries: list[Input] = []
        self.pool: dict[str, Input] = {}
        self.candidates: list[list[str]] = []
        self.relevance: list[dict[str, float]] = []

    def candidate(self, name: str, item: Input) -> str:
        self.pool.setdefault(name, item)
        return name

    def query(self, item: Input, candidates: Iterable[str] | None, relevant: dict[str, float]):
        self.queries.append(item)
        self.candidates.append(list(candidates or []))
        self.relevance.append(relevant)

    def finish(self) -> TaskData:
        if not self.queries:
            raise ValueError(f"MMEB-V2 task {self.task.name}: no queries were read")
        local = self.task.scope == "local"
        return TaskData(
            self.task, self.queries, self.pool, self.candidates if local else None, self.relevance
        )


def _join(*parts: str) -> str:
    return " ".join(p.strip() for p in parts if p and p.strip())


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def _image_task(reader: Reader, task: Task, out: _Builder) -> None:
    """MMEB-V1's rows (ziyjiang/MMEB_Test_Instruct): the first candidate is the positive."""
    root = reader.assets / "image-tasks"

    def image(path: str) -> str | None:
        return str(root / path) if path else None

    for row in reader.rows(task):
        query = Input(_join(row["qry_inst"], row["qry_text"]), image(row["qry_img_path"]))
        names = []
        for text, path in zip(row["tgt_text"], row["tgt_img_path"]):
            if path:  # an image candidate: its instruction and caption; named path:caption
                item = Input(_join(row["tgt_inst"], text), image(path))
                names.append(out.candidate(f"{path}:{text}", item))
            else:
                names.append(out.candidate(text, Input(text)))
        out.query(query, names, {names[0]: 1.0})


def _beir_task(reader: Reader, task: Task, out: _Builder) -> None:
    """Visual documents in BEIR form: queries, qrels (gain > 0; a repeated pair keeps its
    largest gain), corpus pages. Queries without qrels are not scored, as in the public code."""
    qrels: dict[str, dict[str, float]] = {}
    for row in reader.rows(task, "qrels"):
        score = float(row["score"])
        if score > 0:
            pages = qrels.setdefault(str(row["query-id"]), {})
            pages[str(row["corpus-id"])] = max(score, pages.get(str(row["corpus-id"]), 0.0))
    corpus = reader.rows(task, "corpus")
    if hasattr(corpus, "cast_column"):  # bytes, not decoded PIL images
        import datasets  # noqa: PLC0415

        corpus = corpus.cast_column("image", datasets.Image(decode=False))
    for row in corpus:
        page = row["image"]
        page = page.get("bytes") or page.get("path") if isinstance(page, dict) else page
        out.candidate(str(row["corpus-id"]), Input(DOC_CANDIDATE, page))
    for row in reader.rows(task, "queries"):
        relevant = qrels.get(str(row["query-id"]))
        if not relevant:
            continue  # the public code scores queries that have qrels only
        missing = [page for page in relevant if page not in out.pool]
        if missing:
            raise ValueError(
                f"MMEB-V2 task {task.name}: query {row['query-id']} names pages {missing[:3]} "
                f"that {task.repo}'s corpus does not hold; re-download its corpus"
            )
        out.query(Input(_join(DOC_QUERY, row["query"])), None, relevant)


DOC_QUERY = "Find a document image that matches the given query:"
DOC_CANDIDATE = "Understand the content of the provided document image."
VIDEO_CANDIDATE = "Understand the content of the provided video."
CLS_INSTRUCTIONS = {
    "Kinetics-700": "Recognize the category of the video content.",
    "SmthSmthV2": "What actions or object interactions are being performed by the person in "
    "the video?",
    "UCF101": "What activities or sports are being performed by the person in the video?",
    "HMDB51": "What actions or objects interactions are the person in the video doing?",
    "Breakfast": "Recognize the breakfast type that the person is cooking in the video.",
}


def _video_cls_task(reader: Reader, task: Task, out: _Builder) -> None:
    """Video classification: the video asks for its label. Global tasks rank every label of
    the task (here the labels its rows name, in order of first use); SmthSmthV2 ranks its own
    positive and `neg_text`."""
    instruction = CLS_INSTRUCTIONS[task.name]
    for row in reader.rows(task):
        label = str(row["pos_text"])
        query = Input(instruction, video=reader.frames("video_cls", task, str(row["video_id"])))
        names = [out.candidate(label, Input(label))]
        if task.scope == "local":
            names += [out.candidate(str(n), Input(str(n))) for n in row["neg_text"]]
        out.query(query, names, {label: 1.0})


RET_COLUMNS = {  # task: (column naming the video's frame folder, caption column)
    "MSR-VTT": ("video_id", "caption"),
    "MSVD": ("video_id", "caption"),
    "DiDeMo": ("video", "caption"),
    "VATEX": ("videoID", "enCap"),
    "YouCook2": ("id", "sentence"),
}
RET_INSTRUCTIONS = {
    "MSR-VTT": "Find a video that contains the following visual content:",
    "MSVD": "Find the video snippet that corresponds to the given summary:",
    "DiDeMo": "Find a video that includes the following described scenes:",
    "VATEX": "Select a video that fits the description provided:",
    "YouCook2": "Find a video that demonstrates the following action while making a recipe:",
}


def _video_ret_task(reader: Reader, task: Task, out: _Builder) -> None:
    """Text to video over the task's every video (a list of captions: the first)."""
    video_column, caption_column = RET_COLUMNS[task.name]
    for row in reader.rows(task):
        video = pathlib.PurePosixPath(str(row[video_column])).stem
        name = out.candidate(
            video, Input(VIDEO_CANDIDATE, video=reader.frames("video_ret", task, video))
        )
        caption = str(_first(row[caption_column]))
        out.query(Input(_join(RET_INSTRUCTIONS[task.name], caption)), None, {name: 1.0})


QA_INSTRUCTION = (
    "Given a video and a question, select the most accurate answer from the provided "
    "candidates. Return only the exact text of your chosen answer. Question: "
)


def _letter(index: int) -> str:
    return chr(ord("A") + index)


def _qa_options(task: str, row: Any) -> tuple[str, str, list[str], int, str]:
    """(question text, video column value, candidate texts, index of the answer, frame subdir)
    of one V-QA row, with the question's options written as the public code writes them."""
    question = str(row["question"])
    if task == "Video-MME":
        options = [str(o) for o in row["options"]]
        texts = [o.split(". ", 1)[1] if ". " in o[:4] else o for o in options]
        answer = ord(str(row["answer"]).strip()[0]) - ord("A")
        return question + "\n" + "\n".join(options), str(row["videoID"]), texts, answer, ""
    if task == "NExTQA":
        texts = [str(row[f"a{i}"]) for i in range(5)]
        listed = "\n".join(f"({_letter(i)}) {t}" for i, t in enumerate(texts))
        return f"{question}\nOptions:\n{listed}", str(row["video"]), texts, int(row["answer"]), ""
    if task == "EgoSchema":
        options = [str(o) for o in row["option"]]
        texts = [o.split(". ", 1)[1] if ". " in o[:4] else o for o in options]
        answer = str(row["answer"]).strip()
        index = int(answer) if answer.isdigit() else ord(answer[0]) - ord("A")
        return question + " ".join(options), str(row["video_idx"]), texts, index, ""
    if task == "MVBench":
        texts = [f"({_letter(i)}) {c}" for i, c in enumerate(row["candidates"])]
        index = [str(c) for c in row["candidates"]].index(str(row["answer"]))
        listed = "\n".join(texts)
        subset = str(row["subset"])
        return f"{question}\nOptions:\n{listed}", str(row["video"]), texts, index, subset
    if task == "ActivityNetQA":
        index = 0 if str(row["answer"]).strip().lower() == "yes" else 1
        return f"{question}? (A) yes; (B) no.", str(row["video_name"]), ["yes", "no"], index, ""
    raise KeyError(f"no V-QA option format for task {task}")


def _video_qa_task(reader: Reader, task: Task, out: _Builder) -> None:
    """Video question answering over each question's own options (text, no instruction)."""
    for row in reader.rows(task):
        question, video, texts, answer, subdir = _qa_options(task.name, row)
        folder = pathlib.PurePosixPath(video).stem if not subdir else video
        frames = reader.frames("video_qa", task, *([subdir] if subdir else []), folder)
        names = [out.candidate(t, Input(t)) for t in texts]
        out.query(Input(QA_INSTRUCTION + " " + question, video=frames), names, {names[answer]: 1.0})


def _video_mret_task(reader: Reader, task: Task, out: _Builder) -> None:
    """Moment retrieval: the whole video (its `query/` frames) and the description ask for the
    clip; every other sub-folder is a candidate clip, the positive's name starts 'positive'."""
    instruction = "Find the clip that corresponds to the described scene in the given video:"
    for row in reader.rows(task):
        video = pathlib.PurePosixPath(str(row["video_path"])).stem
        folder = pathlib.Path(reader.frames("video_mret", task, video))
        clips = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "query")
        if not any(c.startswith("positive") for c in clips):
            raise FileNotFoundError(f"{folder}: no clip folder named positive*; re-extract it")
        names = [
            out.candidate(f"{video}/{c}", Input(VIDEO_CANDIDATE, video=str(folder / c)))
            for c in clips
        ]
        relevant = {n: 1.0 for n, c in zip(names, clips) if c.startswith("positive")}
        query = Input(_join(instruction, str(row["query"])), video=str(folder / "query"))
        out.query(query, names, relevant)


def _moment_task(reader: Reader, task: Task, out: _Builder) -> None:
    """MomentSeeker: a text, text+image or text+video query against its positive and negative
    clips (each a frame folder)."""
    clip_text = "Understand the content of the provided video clip."
    base = pathlib.Path(reader.frames("video_mret", task))
    for row in reader.rows(task):
        given, query_text = str(row["input_frames"] or ""), str(row["query"])
        if not given:
            query = Input(_join("Find the clip that corresponds to the given text:", query_text))
        elif given.lower().endswith((".jpg", ".jpeg", ".png")):
            text = "Select the video clip that aligns with the given text and image:"
            query = Input(_join(text, query_text), image=str(base / given))
        else:
            text = "Find the clip that corresponds to the given sentence and video segment:"
            query = Input(_join(text, query_text), video=str(base / given))
        names, relevant = [], {}
        for key, gain in (("positive_frames", 1.0), ("negative_frames", 0.0)):
            for clip in row[key]:
                folder = base / "video_frames" / str(clip["output_path"]).replace("/", "_")
                names.append(out.candidate(str(folder), Input(clip_text, video=str(folder))))
                if gain:
                    relevant[names[-1]] = gain
        out.query(query, names, relevant)


_PARSERS = {
    "image": _image_task,
    "beir": _beir_task,
    "video_cls": _video_cls_task,
    "video_ret": _video_ret_task,
    "video_qa": _video_qa_task,
    "video_mret": _video_mret_task,
    "moment": _moment_task,
}
