"""Defaults shared by every stat-jax command. Each section belongs to one part of the package:

  model / mesh     stat_jax.models, stat_jax.sharding
  data / train     stat_jax.train.sft (SFT data, optimizer, checkpoints)
  rollout          stat_jax.rollout (JetStream engine, sampling)
  eval             stat_jax.eval
  teacher          stat_jax.teacher
  stat             stat_jax.stat (pipeline stages)
  grpo             stat_jax.train.grpo

Experiment files (`configs/sft_qwen2_5_3b.py`, ...) start from `get_config()` here and change what
they need; every field can be overridden with `--config.section.field=value`.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"  # everything a run writes goes under here

    c.model = ConfigDict()
    c.model.path = ""  # local HF checkpoint directory, or a hub name (needs network)
    c.model.tokenizer_path = ""  # defaults to model.path
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    # Rematerialisation of the training forward: none | full (recompute each layer) | dots (keep matmul outputs).
    # full keeps GRPO 16 x 512 of the real student within 8 GB at no loss of speed (docs/decisions.md).
    c.model.remat = "full"
    # Query positions per block of the training forward's causal attention (flash-style backward); 0 = the older
    # autodiff blocks. 128: the fastest step and the least GRPO memory at the paper shapes (docs/decisions.md).
    c.model.attention_block = 128

    c.mesh = ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.tensor = 1

    # Multi-process jobs (stat_jax.distributed; which processes form the job comes from flags/env, not here).
    # A host that dies or stalls must end the job, not hang it: stat-jax's peer watch ends every process with an
    # error naming the dead one's host and pid once its heartbeat has stopped for heartbeat_timeout_s / 2 (JAX's
    # coordination service checks at 2 x heartbeat_timeout_s, only as a backstop); a rollout step, broadcast or
    # barrier that every process must finish ends the job after collective_timeout_s with an error naming the
    # unresponsive process and host (it includes compiling that step's programs; 0 = no limit).
    c.distributed = ConfigDict()
    c.distributed.heartbeat_timeout_s = 100
    c.distributed.collective_timeout_s = 900.0

    # SFT data (stat_jax.data.sft_data): records {prompt | messages, response}, rendered with the chat template.
    c.data = ConfigDict()
    c.data.train_files = ()  # JSON/JSONL files (or save_to_disk dirs); on the CLI: --config.data.train_files=a.jsonl,b.jsonl
    c.data.dataset = ""  # a `datasets` hub name or local path, added to train_files
    c.data.dataset_split = "train"
    c.data.max_length = 2048  # tokens per training row; longer examples are dropped (and counted), not truncated
    c.data.packing = True  # several examples per row with per-example attention (False: one padded example per row)

    # Optimizer, loop, checkpoints (stat_jax.train.sft; optimizer/checkpoint/metrics helpers shared with grpo).
    c.train = ConfigDict()
    c.train.steps = 0  # optimizer updates; 0 = train.epochs passes over the data
    c.train.epochs = 3.0
    c.train.batch_size = 64  # rows (packed sequences) per optimizer update, over all devices and hosts
    # Micro-batches per update (batch_size must be a multiple of it); 0 = the fewest that fit the memory budget,
    # by XLA's memory analysis of the compiled step (stat_jax.train.memory), so a smaller machine runs slower
    # instead of running out of memory; a step that cannot fit at all stops before loading the model.
    c.train.grad_accum_steps = 0
    c.train.memory_budget_gb = 0.0  # per device; 0 = train.memory_fraction of the device's memory
    c.train.memory_fraction = 0.85  # on CPU: of the host's RAM (or cgroup limit) split over its local devices
    c.train.loss_chunk_tokens = 2048  # rows x positions of float32 logits alive at once in the loss; 0 = all
    c.train.learning_rate = 1e-5
    c.train.lr_schedule = "cosine"  # cosine | linear | constant, after a linear warmup
    c.train.warmup_steps = 0
    c.train.warmup_ratio = 0.03  # used when warmup_steps is 0
    c.train.min_lr_ratio = 0.0
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.eps = 1e-8
    c.train.max_grad_norm = 1.0  # 0 = no clipping
    c.train.checkpoint_every = 500  # steps; a checkpoint is also written at the end and on SIGTERM
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True
    c.train.log_every = 1
    c.train.export_dir = ""  # HF export of the final weights; default <workdir>/hf
    c.train.export_dtype = "float32"
    c.train.tensorboard = True  # event files under <workdir>/tensorboard when tensorboardX is installed
    # Low-rank adapters (stat_jax/models/lora.py): the base is frozen and only the adapters are trained,
    # checkpointed (with a fingerprint of the base) and exported (PEFT files in <workdir>/adapter, next to the
    # merged HF export). rank 0 = full fine-tuning. The paper's SFT (App. C.1): rank 16, alpha 32, dropout 0.05.
    c.train.lora = ConfigDict()
    c.train.lora.rank = 0
    c.train.lora.alpha = 32.0  # the adapter output is scaled by alpha / rank (PEFT's lora_alpha)
    c.train.lora.dropout = 0.05  # on each adapter's input, during training only
    c.train.lora.targets = "q,k,v,o,gate,up,down"  # projections of every layer: any of q,k,v,o,gate,up,down
    # The frozen base's projection kernels stored quantized (stat_jax/models/quant.py, via qwix) and dequantized
    # at the compute dtype in each projection: none | int8 (per output channel) | int4 | nf4 (per 64 weights, as
    # the paper's QLoRA NF4 base). Needs rank > 0; embeddings, head and norms stay unquantized.
    c.train.lora.base_quant = "none"

    # Student rollouts (stat_jax.rollout): JetStream in-process, or a client of `stat-jax serve`.
    c.rollout = ConfigDict()
    c.rollout.backend = "jetstream"  # jetstream (in-process, same mesh) | client (rollout.address)
    # Decode slots = the generate batch; 0 = auto: as many as keep every slot's full-length KV cache within
    # rollout.cache_memory_fraction of the device memory (on CPU: host RAM); the figure is logged at start.
    c.rollout.max_concurrent_decodes = 0
    c.rollout.cache_memory_fraction = 0.3
    c.rollout.max_prefill_length = 1024  # largest prompt bucket (a power of two >= 16); buckets 16, 32, ...
    # KV cache per slot: prompt + new tokens must stay below it; 0 = auto: max_prefill_length + 2048 (STAT's
    # rollout_max_new_tokens), capped by the model's context. In-process rollouts allocate the cache only up to
    # the longest sequence in flight (power-of-two length buckets), so short rollouts pay for short caches.
    c.rollout.max_target_length = 0
    c.rollout.cache_dtype = ""  # "" = model.dtype (the compute dtype)
    c.rollout.prefill_batch_tokens = 2048  # in-process: prompts of one bucket prefilled together, padded tokens
    c.rollout.truncate_long_prompts = False  # True: keep the last max_prefill_length tokens, with a warning
    # Prompts that break the limits above (stat_jax/lengths.py), checked before any device work in eval, the
    # rollout stage and GRPO: skip (left out, counted in summaries/manifests) | error (stop, listing them all).
    c.rollout.on_long_prompt = "skip"
    c.rollout.host = "127.0.0.1"  # `stat-jax serve` binds here; "::" or "0.0.0.0" exposes it
    c.rollout.port = 9000
    c.rollout.server_threads = 0  # gRPC handler threads; 0 = 2 x max_concurrent_decodes
    # Sampling for served requests that carry none (plain JetStream clients); stat-jax clients send their own.
    c.rollout.temperature = 0.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.seed = 0
    c.rollout.address = ""  # HOST:PORT of a `stat-jax serve` server, for backend=client
    c.rollout.client_max_workers = 64  # concurrent streaming Decode calls
    c.rollout.client_retries = 3  # on UNAVAILABLE / RESOURCE_EXHAUSTED, with exponential backoff
    c.rollout.client_backoff_s = 1.0
    c.rollout.client_timeout_s = 3600.0

    c.eval = ConfigDict()
    c.eval.benchmarks = ("math500",)  # on the CLI: --config.eval.benchmarks=math500,aime24
    # Local copies (JSON/JSONL/parquet or a MATH-style tree); "" loads the default hub copy.
    # A benchmark of your own needs no code: --config.eval.benchmarks=mine --config.eval.paths.mine=FILE.jsonl
    # (rows with a question and an answer, or a solution with \boxed{}); new names may be added to paths/fields.
    c.eval.paths = ConfigDict({k: "" for k in ("math", "math_train", "math500", "gsm8k", "aime24", "aime25", "amc23")})
    # Which of a file's fields are the problem/answer/solution/id/subject/level: fields.mine="problem:q,answer:a".
    c.eval.fields = ConfigDict()
    c.eval.limit = 0  # first N questions per benchmark; 0 = all
    c.eval.on_bad_row = "skip"  # skip: malformed rows are left out and counted in the summary | error: stop
    c.eval.exclude_from = ""  # JSONL of questions left out of every benchmark (a STAT run's data/heldout.jsonl)
    c.eval.instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    c.eval.system_prompt = ""
    c.eval.use_chat_template = True
    # The date chat templates that read one (Llama-3.x) write into every prompt, instead of today's: prompts then
    # stay identical across days (resumed rollouts, SFT vs eval). Used by rollout, SFT, eval and GRPO prompts.
    c.eval.date_string = "26 Jul 2024"
    c.eval.few_shot = 0  # worked examples from eval.few_shot_from, as earlier chat turns
    c.eval.few_shot_from = "math_train"
    c.eval.greedy = True  # pass@1 with greedy decoding
    c.eval.num_samples = 0  # k samples per question for avg@k / pass@j; 0 = greedy only
    c.eval.temperature = 0.6
    c.eval.top_p = 0.95
    c.eval.top_k = 0
    c.eval.pass_k = (2, 4, 8, 16, 32, 64)  # pass@j reported for each j <= num_samples
    c.eval.max_new_tokens = 2048
    c.eval.grade_workers = 2
    c.eval.grade_timeout = 10.0  # seconds per graded answer before its worker is killed
    c.eval.chunk_size = 256  # questions per generate-grade-append step (the unit of --resume)
    c.eval.out_dir = ""  # default: <workdir>/eval
    # Each answer is graded strictly (pass@1: the last \boxed{}, the paper's protocol) and flexibly (pass@1_flexible:
    # lm-eval's rule for GSM8K, math-verify's last expression otherwise); this picks each benchmark's headline.
    # GSM8K's is lm-eval's (small students rarely box their answer); --config.eval.headline.NAME=flexible for others.
    c.eval.headline = ConfigDict({"gsm8k": "flexible"})

    # Teacher (stat_jax.teacher). Credentials never go here: GEMINI_API_KEY / GOOGLE_API_KEY or Vertex AI.
    c.teacher = ConfigDict()
    c.teacher.backend = "gemini"  # or "package.module:ClassName" of another TeacherBackend
    # The paper's teacher is GPT-4o-mini, a small fast model; gemini-2.5-flash is Google's counterpart (its cost per
    # paper-sized run next to GPT-4o-mini's: README "Teacher cost"). gemini-2.5-pro is ~4x its price.
    c.teacher.model = "gemini-2.5-flash"
    c.teacher.base_url = ""  # "" = the client's default endpoint
    c.teacher.api_key_env = ""  # "" = GEMINI_API_KEY, then GOOGLE_API_KEY
    c.teacher.vertexai = False
    c.teacher.project = ""
    c.teacher.location = ""
    c.teacher.timeout_s = 120.0
    c.teacher.max_output_tokens = 0  # tasks missing from max_output_tokens_by_task; 0 = the model's default
    # Output cap per teacher task (stat_jax/teacher/prompts.py); on Gemini 2.5 it bounds answer + thinking, and
    # `run --dry-run` prices each task's output at this cap (an upper bound). A MATH solution is ~300-600 tokens.
    c.teacher.max_output_tokens_by_task = ConfigDict({
        "propose_skills": 1024, "merge_skills": 8192, "label_skills": 512, "diagnose": 2048, "synthesize": 3072,
        "solve": 4096, "rate_difficulty": 256})
    # Thinking tokens per task (google-genai ThinkingConfig.thinking_budget): 0 = none (gemini-2.5-flash; 2.5-pro
    # needs >= 128), -1 = the model decides; a task left out gets the model's default. Billed as output tokens.
    c.teacher.thinking_budget_by_task = ConfigDict({
        "propose_skills": 0, "merge_skills": 1024, "label_skills": 0, "diagnose": 512, "synthesize": 1024,
        "solve": 1024, "rate_difficulty": 0})
    c.teacher.temperature = 0.7  # for synthesize/solve (several samples); catalog/label/diagnose use 0
    c.teacher.max_workers = 8  # concurrent requests
    c.teacher.max_retries = 5  # on 429/5xx/timeouts, exponential backoff with jitter
    c.teacher.backoff_initial_s = 2.0
    c.teacher.backoff_max_s = 60.0
    c.teacher.max_reasks = 2  # re-asks with the validation error when an answer does not fit the schema
    # Hard budget over the run's ledger (failed attempts count); 0 = no cap. A paper-sized run plans ~25k calls
    # (STAT-Sel: 7.5k propose + 7 merge + 7.5k label + 500 diagnose + 9.5k answers; STAT-Syn ~26k), so 36k leaves
    # room for retries and re-asks; `stat-jax run --dry-run` prints the plan and refuses one over the cap.
    c.teacher.max_calls = 36000
    c.teacher.max_tokens = 0
    # USD per million tokens, for the ledger and the dry-run plan: gemini-2.5-flash's list price (2025; output
    # includes thinking). gemini-2.5-pro: 1.25 / 10.0 (<= 200k context); GPT-4o-mini: 0.15 / 0.60.
    c.teacher.price_input_per_mtok = 0.30
    c.teacher.price_output_per_mtok = 2.50
    c.teacher.cache_dir = ""  # default: <run_dir>/teacher (cache/ + ledger.jsonl)
    # teacher.backend=offline (stat_jax/teacher/offline.py): the demo's rule-based teacher of the arithmetic task.
    c.teacher.offline_seed = 0
    c.teacher.offline_slip_rate = 0.25  # probability that a solution it writes has an arithmetic slip
    c.teacher.offline_label_noise = 0.0  # probability that a skill label it gives is replaced by a random one
    c.teacher.offline_max_missing = 3  # most skills it names as missing in one diagnosis

    # STAT pipeline (stat_jax.stat); defaults follow the paper.
    c.stat = ConfigDict()
    c.stat.run_dir = ""  # default: <workdir>/stat
    # A directory of finished stages shared by runs (stat_jax/stat/stage_cache.py): a stage whose inputs and every
    # config field it read are unchanged is copied from it, so runs that differ only in later stages profile once.
    c.stat.stage_cache = ""  # "" = none
    c.stat.stages = ("data", "skills", "label", "rollout", "hard", "diagnose", "profile", "sel", "sft", "eval")
    # Which set the sft stage trains on: sel | syn | sel+syn, or one of the paper's baselines (stat_jax/stat/
    # baselines.py), each built by the stage of its name: math_train (the training questions, dataset solutions;
    # stages data,math_train,sft,eval) | math_hard (the hardest levels; data,math_hard,sft,eval) | embed_sel
    # (nearest training questions to the difficult ones; data,rollout,hard,embed_sel,sft,eval).
    c.stat.method = "sel"
    # Train on the method's set drawn in seeded passes until this many tokens (every method compared at the same
    # budget trains on as many tokens, however many pairs it has; the demo's comparison). 0: the set as it is.
    c.stat.token_budget = 0
    # The seed of the profiling and set-building stages; -1: `seed`. Fixed, a sweep over training seeds (`seed`)
    # profiles once.
    c.stat.seed = -1
    c.stat.train_benchmark = "math_train"  # a stat_jax.data.math_datasets benchmark name
    c.stat.train_source = ""  # local file/dir or hub name; "" = the benchmark's default copy
    c.stat.train_limit = 0
    c.stat.heldout_benchmark = "math"
    c.stat.heldout_source = ""
    c.stat.heldout_limit = 0
    # The profile is built on a seeded validation split of the held-out source (the paper: 1,000 of MATH test;
    # the `math` evaluation of a run is then the other 4,000). Questions of stat.heldout_exclude (matched by
    # MATH unique_id or problem text) never enter it, so those benchmarks stay unseen. 0 = the whole source.
    c.stat.heldout_size = 1000
    c.stat.heldout_seed = 0
    c.stat.heldout_exclude = ("math500",)  # benchmark names; sources from eval.paths (else the hub)
    c.stat.on_bad_row = "skip"  # data stage: skip (malformed rows counted in its manifest) | error: stop
    c.stat.instruction = ""  # "" = eval.instruction, so rollouts, SFT and eval see the same prompt
    # Questions per subject the teacher names skills for to build the catalog: 0 = every training question (the
    # paper, after Didolkar et al.: 7.5k propose calls on MATH); N = a seeded N per subject (200: 1.4k calls, a
    # catalog from a sample). `run --dry-run` prints both costs.
    c.stat.skills_sample_per_subject = 0
    c.stat.propose_max_skills = 3
    c.stat.catalog_max_skills = 25  # per subject
    c.stat.label_max_skills = 3
    c.stat.rollout_samples = 5  # answers per held-out question; the consistency rule needs >= 2 (the paper: 5)
    c.stat.rollout_temperature = 0.6
    c.stat.rollout_top_p = 0.95
    c.stat.rollout_max_new_tokens = 2048
    c.stat.rollout_chunk_size = 256
    # Which held-out questions are hard (stat_jax/stat/hard.py), label-free unless accuracy is chosen:
    # auto = prm when stat.prm_path is set, else consistency | consistency: fewer than stat.consistency_min_agree
    # of the student's stat.rollout_samples final answers agree (math-verify equivalence; the paper's cheaper
    # heuristic, 79.8% vs the PRM's 78.0%) | prm (the paper's choice) | accuracy: the grader against the reference
    # answers (uses labels), hard when the mean accuracy < stat.hard_threshold.
    c.stat.scorer = "auto"
    c.stat.consistency_min_agree = 2  # the paper: hard when the most common of 5 answers appears < 2 times
    # The PRM (stat.scorer=prm; stat_jax/models/prm.py). rlhflow: RLHFlow/Llama3.1-8B-PRM-Mistral-Data, the paper's
    # (a Llama chat answering +/- after each step) | qwen: Qwen2.5-Math-PRM (a score head at <extra_0> separators).
    c.stat.prm_format = "rlhflow"
    c.stat.prm_path = ""  # HF dir of a checkpoint in stat.prm_format
    # paper: a response is flagged when its last step <= prm_last_step_threshold, the mean of its steps <=
    # prm_mean_threshold or any earlier step <= prm_earlier_step_threshold (the paper's 0.85 / 0.85 / 0.7) |
    # min | product: that aggregate of the step scores as the response's score.
    c.stat.prm_rule = "paper"
    c.stat.prm_last_step_threshold = 0.85
    c.stat.prm_mean_threshold = 0.85
    c.stat.prm_earlier_step_threshold = 0.7
    c.stat.prm_dtype = "bfloat16"  # weights and compute, sharded on c.mesh like the student (8B: 2 GB/device on 8)
    # Tokens per PRM input; longer ones keep the question and the last steps (earliest steps dropped, counted in
    # hard/manifest.json as `truncated`).
    c.stat.prm_max_length = 4096
    c.stat.prm_batch_size = 8  # sequences per PRM forward; a multiple of the mesh's data x fsdp size
    c.stat.num_hard = 500
    c.stat.hard_threshold = 1.0  # accuracy / prm: only questions with mean score below this can be hard
    c.stat.grade_workers = 2  # 0 = grade in-process
    # Missing skills a diagnosis names (or an explicit "none missing"): the paper's prompt asks for 2-3.
    c.stat.diagnose_min_skills = 2
    c.stat.diagnose_max_skills = 3
    c.stat.sel_questions_per_skill = 5
    c.stat.sel_answers_per_question = 3
    # teacher: stat.sel_answers_per_question teacher-written answers (the paper's STAT-Sel) | dataset: the dataset's
    # solution only | dataset+teacher: the solution + (answers - 1) teacher answers. Used by MATH-Hard/Embed-* too.
    c.stat.sel_answer_source = "teacher"
    # none: every teacher answer is kept (the paper) | reference: drop one whose final answer disagrees with the
    # dataset's (uses the labels; the stage's stats say uses_reference_labels).
    c.stat.sel_answer_filter = "none"
    c.stat.sel_target_size = 9500
    c.stat.syn_reference_questions = 3
    c.stat.syn_new_questions = 2
    c.stat.syn_solutions = 3
    c.stat.syn_min_agree = 2
    c.stat.syn_target_size = 0  # 0 = keep all
    # Baselines: every set has exactly this many pairs (0 = stat.sel_target_size, the paper's 9.5k for every
    # set); fewer distinct pairs are repeated (counted in <stage>/stats.json). MATH-Hard and Embed-Sel answer
    # as STAT-Sel does (stat.sel_answer_source, stat.sel_answers_per_question); MATH-Train with dataset solutions.
    c.stat.baseline_size = 0
    # What rates the training questions for MATH-Hard: level (MATH's Level field, the paper) | teacher (a 1-5
    # rating per question: one teacher call each) | prm (the PRM at stat.prm_path scores each dataset solution).
    c.stat.math_hard_rating = "level"
    c.stat.math_hard_top_levels = 2  # level/teacher: the top levels (ratings) present: MATH Level 4-5, as in the paper
    c.stat.math_hard_share = 0.53  # prm: the lowest-scored share kept (MATH train's Level 4-5 share: 3,994 / 7,500)
    c.stat.embed_model = ""  # Embed-Sel: "" = the student's mean-pooled hidden states; or an HF encoder directory
    c.stat.embed_per_question = 5  # nearest training questions per difficult question (the paper: 5)
    # Embed-Syn: synthesis requests per difficult question, each with the next stat.syn_reference_questions nearest
    # training questions (3 = STAT-Syn's 2-3 (question, missing skill) pairs per question, at most).
    c.stat.embed_syn_requests_per_question = 3
    c.stat.embed_max_tokens = 1024  # each question's first tokens that are embedded
    c.stat.embed_batch_size = 16  # questions per embedding forward pass
    # Continual STAT (PAPER.md §3.3): round > 1 starts from the student that stat.previous_run (round 1's
    # <workdir>/stat) trained, profiles this run's held-out file (stat.heldout_source: the new validation set,
    # e.g. with stat.heldout_size=0) and trains further; it reuses that run's catalog and Skill-Map when the
    # training set is the same. Its run directory (own workdir) gets its own manifests and round.json.
    c.stat.round = 1
    c.stat.previous_run = ""
    # The student round 1 trained, when that training ran outside its sft stage (the demo fine-tunes each seed
    # itself): "" = the model stat.previous_run's sft/done.json names.
    c.stat.previous_student = ""
    c.stat.wait_timeout_s = 86400.0  # other hosts wait this long for process 0's teacher stages
    c.grpo = ConfigDict()
    c.grpo.train_files = ()  # JSONL of {problem, answer} rows (e.g. MATH train, or a STAT-Sel question list)
    # `stat-jax run`'s grpo stage: uniform (train_files, else data/train.jsonl) | profile (skill-targeted: Skill-Map
    # questions in proportion to the Missing-Skill-Profile, STAT-Sel's rule; needs the diagnose and label stages).
    c.grpo.prompt_weighting = "uniform"
    c.grpo.instruction = ""  # "" = eval.instruction
    c.grpo.steps = 200
    c.grpo.prompts_per_step = 32
    c.grpo.num_generations = 8  # G samples per prompt (G requests to JetStream)
    # Prompts sampled per trained prompt: > 1 trains on the groups whose rewards differ (DAPO's dynamic sampling)
    c.grpo.oversample = 1
    c.grpo.num_iterations = 1  # updates (mu) per rollout batch; old log-probs computed once (skipped when 1)
    c.grpo.micro_batches = 0  # gradient accumulation over the prompts_per_step * G rows; 0 = fit the budget
    c.grpo.memory_budget_gb = 0.0  # per device, for the update step; 0 = grpo.memory_fraction of the device
    c.grpo.memory_fraction = 0.6  # lower than SFT's: the rollout engine's KV cache lives beside the step
    c.grpo.loss_chunk_tokens = 2048  # rows x positions of float32 logits alive at once; 0 = all at once
    c.grpo.max_length = 1024  # tokens per training row: prompt + completion must fit
    c.grpo.max_new_tokens = 768
    c.grpo.temperature = 1.0  # sampling temperature; the trained log-probs are of logits / temperature
    c.grpo.top_p = 1.0
    c.grpo.top_k = 0
    c.grpo.epsilon_low = 0.2
    c.grpo.epsilon_high = 0.2  # > epsilon_low gives DAPO's clip-higher
    c.grpo.beta = 0.0  # k3 KL coefficient to the frozen start model; 0 does not even keep a reference copy
    c.grpo.scale_rewards = True  # divide advantages by the group std (GRPO); False = Dr. GRPO
    c.grpo.loss_aggregation = "token"  # token: mean over all completion tokens | sequence: mean of per-row means
    # Reweighting by p_trainer / p_engine, the engine's own sampling log-probs: none | token_tis (min(r, tis_cap)
    # per token) | sequence_mask (answers whose product of ratios exceeds tis_cap are left out).
    c.grpo.rollout_correction = "token_tis"
    c.grpo.tis_cap = 2.0
    # An answer cut at max_new_tokens: keep | mask (left out of the loss) | penalize (DAPO's soft overlong
    # punishment: reward - overlong_penalty * (0 .. 1) over the last overlong_buffer tokens).
    c.grpo.truncated = "keep"
    c.grpo.overlong_buffer = 0
    c.grpo.overlong_penalty = 1.0
    c.grpo.format_reward = 0.0  # added when the response has a \\boxed{} answer
    c.grpo.reward = "math"  # math: 1 if the grader accepts the final answer | "package.module:function"
    c.grpo.learning_rate = 1e-6
    c.grpo.lr_schedule = "constant"
    c.grpo.warmup_steps = 0
    c.grpo.warmup_ratio = 0.0
    c.grpo.weight_decay = 0.0
    c.grpo.max_grad_norm = 1.0
    c.grpo.b1 = 0.9
    c.grpo.b2 = 0.99
    c.grpo.checkpoint_every = 20
    c.grpo.keep_checkpoints = 2
    c.grpo.async_checkpointing = True
    c.grpo.export_dtype = "float32"
    return c
