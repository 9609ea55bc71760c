"""Few-shot evaluation config (paper §2.5, App. B.1.4-5) for `python -m flamingo_jax.evaluate`.

    python -m flamingo_jax.evaluate --config configs/fewshot_eval.py --workdir runs/main/flamingo \
        --config.data_dir=runs/main/tfds
    python -m flamingo_jax.evaluate --config configs/fewshot_eval.py:shots=0.4,seeds=1 \
        --workdir runs/main/flamingo --config.num_queries=200 --config.selection='("random",)'

Arguments (`:key=value,...`; lists separated by '.' since ',' separates the arguments):
  tasks  evaluators (flamingo_jax/eval/evaluators.py: EVALUATORS), default easy_vqa
  shots  e.g. 0.4.8.16 (the default; 32 is allowed)
  seeds  number of seeds 0..n-1 (default 3)
  quick=True     the main job's look (launch/local.sh): 200 queries, 0 and 4 shots, random selection,
                 one seed, greedy; and in-context binding at 2/5-way, 1/4 shots with the text-only
                 and shuffled controls (100 episodes, open-ended); a few minutes on the CPU
  runlocal=True  a quick smoke run (easy_vqa built from 200 records per split, 16 queries,
                 0 and 2 shots, one seed, greedy)

The run's own `config.json` gives the model and tokenizer. A `--workdir` without a checkpoint is an
error, unless `--config.baseline_at_init=True` asks for Flamingo at initialisation with the frozen LM
of `lm` (its gates are 0: it computes the LM), which gives the baselines. The default (4 shot counts x 2 selections x 3 seeds + the text-only
runs, 500 questions each) takes hours on a 2-core CPU: `shots=0.4,seeds=1` for a quick look.
"""

import ml_collections

from configs import common

_TASKS = "easy_vqa.easy_vqa_binding"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The evaluation config for `arg`. Long: a flat list of fields, read top to bottom."""
  args = common.parse_args(
    arg, {"tasks": _TASKS, "shots": "0.4.8.16", "seeds": 3, "runlocal": False, "quick": False}
  )
  config = ml_collections.ConfigDict()
  config.data_dir = "runs/tfds"  # TFDS data_dir of the easy_vqa builders
  config.output_subdir = "eval"  # results go to RUN/<output_subdir>/
  config.tasks = tuple(t for t in args["tasks"].split(".") if t)
  config.shots = tuple(int(s) for s in args["shots"].split(".") if s)
  config.num_queries = 500  # test queries per task (all when the split is smaller)
  config.seeds = tuple(range(args["seeds"]))  # support draws / prompt orders; mean, std over them
  config.selection = ("random", "rices")  # in-context example selection; 0-shot is always random
  config.beam = 3  # beam size of open-ended decoding (1 = greedy)
  config.length_penalty = 0.0  # GNMT alpha of beam search (0: summed log-prob)
  config.max_new_tokens = 8  # open-ended VQA answers
  config.caption_max_new_tokens = 20  # captioning (image and video)
  config.batch_size = 32  # prompts per decoding call / rows per scoring call
  config.image_batch_size = 32  # images per vision-encoder call
  config.visual_cache_size = 4096  # media whose visual tokens stay cached (LRU)
  config.prompt_bucket = 32  # prompts are left-padded to a multiple of this length
  config.num_prompts = 6  # close-ended prompt ensembling: support permutations (the paper's 6)
  config.text_only_baseline = True  # the same prompts through the frozen LM, no images
  config.text_only_shots = ()  # shots of the text-only runs (() = config.shots)
  # The model family's prompts (flamingo_jax/eval/prompting.py: FORMATS): 'auto' takes the run's own
  # (a converted OpenFlamingo or IDEFICS: its config.json), else 'flamingo', the paper's.
  config.prompt_format = "auto"
  config.text_only_format = "lm"  # 'lm': as plain text (<image> dropped, <EOC> -> a
  # newline); 'flamingo': the identical token sequence
  config.video_frames = 30  # the paper's 30 (training sees 8: temporal interpolation)
  config.lm = "auto"  # LM when there is no checkpoint: 'auto' (the run's
  # init_from.lm, else 'smollm2'), 'none', or a spec
  config.model_size = "smollm2"  # model when the workdir has no config.json
  config.tokenizer = ""  # '' = the run's config.tokenizer (else 'smollm2')
  config.seed = 0  # init of the untrained parts when no checkpoint
  config.baseline_at_init = False  # True: a workdir without a checkpoint evaluates the
  # model at initialisation (written in results.json)
  # Per-task options: num_queries (-1 = config.num_queries); easy_vqa: max_examples (-1 = all; else
  # a small build of the first n records per split); JSONL files {"image": path, "question": ...,
  # "answers": [...]} or {"image": path, "captions": [...]}, paths relative to the file: `support`
  # gives the in-context examples, `queries` the evaluated ones.
  config.task_options = dict(
    easy_vqa=dict(num_queries=-1, max_examples=-1),
    easy_vqa_captions=dict(num_queries=-1, max_examples=-1),
    easy_vqa_color=dict(num_queries=100, max_examples=-1),
    easy_vqa_shape=dict(num_queries=100, max_examples=-1),
    easy_vqa_video=dict(num_queries=100, max_examples=-1),
    # In-context binding (flamingo_jax/eval/binding.py): N ways x K shots x controls, `episodes`
    # per cell and seed; names_file '' = the packaged evaluation word list (must share no word
    # with the training list of the run's bursty documents); class_mode shape_color | shape |
    # color; ranked: also the close-ended ranking of the N names.
    easy_vqa_binding=dict(
      ways=(2, 3, 5),
      shots=(1, 2, 4),
      episodes=500,
      controls=("text_only", "shuffled", "real_names"),
      names_file="",
      class_mode="shape_color",
      ranked=True,
      max_new_tokens=6,
      max_examples=-1,
    ),
    jsonl_vqa=dict(num_queries=-1, support="", queries=""),
    jsonl_captions=dict(num_queries=-1, support="", queries=""),
  )
  if args["quick"]:
    config.num_queries = 200
    config.shots = (0, 4)
    config.seeds = (0,)
    config.selection = ("random",)
    config.beam = 1
    b = config.task_options.easy_vqa_binding
    b.ways, b.shots, b.episodes, b.controls = (2, 5), (1, 4), 100, ("text_only", "shuffled")
    b.ranked = False
  if args["runlocal"]:
    config.num_queries = 16
    config.shots = (0, 2)
    config.seeds = (0,)
    config.beam = 1
    config.batch_size = 8
    for name, options in config.task_options.items():
      if name == "easy_vqa_binding":
        continue
      options.num_queries = -1
      if name.startswith("easy_vqa"):
        options.max_examples = 200
    b = config.task_options.easy_vqa_binding
    b.ways, b.shots, b.episodes, b.ranked = (2,), (1,), 8, False
    b.max_examples = 600  # >= 2 classes with 2+ images
  return common.finish(config)
