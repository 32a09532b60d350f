"""The base config: every key that library code reads is declared here.

Experiment configs (`configs/NAME.py`) start from `base.get_config()` and set
values; they never add keys, so a typo in a config or on the command line is
an error rather than a silently ignored setting. `config.model` is the one
exception: its keys are the constructor arguments of the model named by
`config.model.name`, and `bigjax.config_validation` checks them against that
class.

This file is Python and runs when loaded, like every config file.
"""

import ml_collections


def get_config(arg=None):
  del arg  # The base has no variants.
  c = ml_collections.ConfigDict()

  # Seed for parameter init, dropout and the data order. Runs with equal
  # configs (seed included) are bitwise reproducible on one topology.
  c.seed = 0
  # Seeds trained together: seed, seed + 1, ..., seed + num_seeds - 1, in one
  # compiled program (`jax.vmap` over their init, dropout and data order; an
  # ablation cell's seeds). Each seed's metrics go to WORKDIR/seed_{value}/
  # and the run's own metrics are their means. 1 is an ordinary run.
  c.num_seeds = 1

  # What is learned, and so which data, loss and metrics (bigjax/tasks.py):
  # 'classification' (images -> classes), 'text_classification' (passages ->
  # the work they come from), 'language_model' (next token of a text) or
  # 'seq2seq' (generated source -> target tasks).
  c.task = 'classification'

  # ---- Data -------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # TFDS name. 'fashion_mnist_local' is our builder over the idx files of the
  # Debian package dataset-fashion-mnist; any TFDS image dataset works online
  # ('mnist', 'cifar10', ...; their Image features need tensorflow installed).
  c.data.name = 'fashion_mnist_local'
  # TFDS data_dir; unset (None) means $TFDS_DATA_DIR or ~/tensorflow_datasets.
  # A typed placeholder, so `--config.data.tfds_data_dir=DIR` can set it.
  c.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  # Feature keys of the TFDS records.
  c.data.image_key = 'image'
  c.data.label_key = 'label'
  # Per-channel mean and std of pixel values scaled to [0, 1]; images are
  # standardised with them. One value broadcasts over channels.
  c.data.mean = (0.2860,)
  c.data.std = (0.3530,)
  # Augmentation, applied in the input pipeline to training batches only.
  c.data.augment = ml_collections.ConfigDict()
  # Pad each side by this many pixels (zeros, before standardisation) and
  # crop back to the original size at a random offset; 0 turns it off.
  c.data.augment.crop_padding = 0
  # Mirror left-right with probability 1/2.
  c.data.augment.horizontal_flip = False
  # Text (task 'language_model'): the TFDS string feature holding each
  # document, the tokenizer ('char': one id per character of the training
  # split, unknown characters -> UNK; 'byte': UTF-8 bytes), and the tokens
  # per training window. The run keeps its vocabulary as
  # WORKDIR/tokenizer.json.
  c.data.text_key = 'text'
  c.data.tokenizer = 'char'
  c.data.seq_len = 256
  # Task 'text_classification': the last passage_holdout of each training
  # work's text is its evaluation set.
  c.data.passage_holdout = 0.1
  # Generated source -> target tasks (task 'seq2seq', bigjax/data/synthetic.py).
  c.data.synthetic = ml_collections.ConfigDict()
  # 'copy', 'reverse', 'sort' or 'addition' (a+b= -> digits of the sum).
  c.data.synthetic.task = 'copy'
  # Source length (for addition: digits per operand), uniform in
  # [min_length, max_length].
  c.data.synthetic.min_length = 1
  c.data.synthetic.max_length = 32
  # Alphabet size; for addition the number base.
  c.data.synthetic.num_symbols = 10
  # Addition only: write operands with max_length digits and the sum with
  # max_length + 1, leading zeros included (fixed place-value positions).
  c.data.synthetic.zero_pad = False
  # The fixed eval set: its size and seed (the same for every run and seed).
  c.data.synthetic.num_eval_examples = 1024
  c.data.synthetic.eval_seed = 0
  # Threads that read and augment training batches ahead of the step.
  c.data.prefetch_threads = 2
  # Batches prepared ahead of the step.
  c.data.prefetch_batches = 4

  # ---- Model ------------------------------------------------------------
  # `name` picks the class from bigjax.models.MODELS; the other keys are its
  # constructor arguments (checked against the class).
  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'

  # ---- Precision (bigjax/precision.py) -------------------------------------
  c.precision = ml_collections.ConfigDict()
  # dtype of the stored parameters: the master copy that gradients, the
  # optimizer state and checkpoints have. 'float32' or 'bfloat16'.
  c.precision.param_dtype = 'float32'
  # dtype every matmul and convolution runs in (parameters and inputs are
  # cast to it at each step); logits and the loss are float32 either way.
  # 'bfloat16' with param_dtype 'float32' is the usual mixed precision on
  # GPU/TPU; CPUs mostly run bfloat16 slower than float32.
  c.precision.compute_dtype = 'float32'

  # ---- Loss and regularisation -------------------------------------------
  c.loss = ml_collections.ConfigDict()
  # 'cross_entropy' (softmax) or 'mse' (squared error between the logits and
  # one-hot targets, as in Hui & Belkin 2021).
  c.loss.name = 'cross_entropy'
  # Label smoothing for cross-entropy, in [0, 1).
  c.loss.label_smoothing = 0.0
  # Penalties added to the loss: l1 * sum|w| and l2 / 2 * sum w^2 over the
  # weight matrices and kernels (biases and norm scales are not penalised).
  c.loss.l1 = 0.0
  c.loss.l2 = 0.0

  # ---- Optimiser ----------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  # 'sgd' (with momentum), 'adam' or 'adamw'.
  c.optimizer.name = 'adam'
  # Peak learning rate (after warmup).
  c.optimizer.learning_rate = 1e-3
  # 'constant' or 'warmup_cosine' (linear warmup, then cosine to
  # learning_rate * final_lr_fraction at the last step).
  c.optimizer.schedule = 'warmup_cosine'
  c.optimizer.warmup_steps = 0
  c.optimizer.final_lr_fraction = 0.0
  # SGD momentum (0 is plain SGD) and Nesterov.
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  # Adam/AdamW moments.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  # Decoupled weight decay, AdamW only (use loss.l2 for coupled L2).
  c.optimizer.weight_decay = 1e-4
  # Clip gradients to this global norm; 0 turns clipping off.
  c.optimizer.grad_clip_norm = 0.0
  # Parameter groups (fine-tuning): regexes of parameter paths (e.g.
  # 'encoder/.*', matched against whole paths as in sharding.txt) that are not
  # trained, and (regex, factor) pairs scaling a group's learning rate.
  c.optimizer.frozen = ()
  c.optimizer.lr_multipliers = ()

  # ---- Training loop ------------------------------------------------------
  # Global batch size, summed over all devices and hosts; must divide by the
  # number of devices.
  c.batch_size = 128
  c.eval_batch_size = 1000
  # Length of training: num_train_steps if > 0, else num_epochs over the
  # training split.
  c.num_train_steps = -1
  c.num_epochs = 10.0
  # Evaluate on the eval split every this many steps, and at the end.
  c.eval_every_steps = 1000
  # Write training metrics (averaged since the last write) every this many
  # steps.
  c.log_every_steps = 100

  # ---- Devices: mesh and sharding ---------------------------------------
  # Sizes of the device mesh's axes, outermost first: data, fsdp, tensor
  # (tensor is innermost, so it stays within a host). -1 takes the devices
  # the others leave. The batch is split over data x fsdp; parameters and
  # optimizer state are split as the sharding rules say.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # How parameters map to mesh axes (bigjax.sharding.PRESETS):
  #   'data_parallel': replicated, batch split over data x fsdp;
  #   'fsdp': every weight also split over 'fsdp' (ZeRO-3 style);
  #   'fsdp_tensor': fsdp plus tensor parallelism over 'tensor' (attention
  #     heads, feed-forward width, vocabulary, conv channels, RNN gates).
  c.sharding_preset = 'data_parallel'
  # Extra (logical axis name, mesh axes) rules tried before the preset's, so
  # they override it, e.g. (('vocab', 'tensor'), ('mlp', None)). Logical
  # names are listed in bigjax/models/axes.py; mesh axes may be a name, a
  # tuple of names, or None (replicated).
  c.sharding_rules = ()

  # ---- Initialisation from another run (fine-tuning) ----------------------
  # When this run has no checkpoint of its own: take the parameters whose
  # paths (as in sharding.txt) fully match one of `params` from the newest
  # verified checkpoint of the run in `workdir`; the other parameters and the
  # optimiser state start fresh. A text run also reuses that run's tokenizer.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.workdir = ml_collections.config_dict.placeholder(str)
  c.init_from.params = ('.*',)

  # ---- Non-finite guard ----------------------------------------------------
  # A step whose loss or gradient is NaN/Inf is skipped (parameters and
  # optimizer state untouched); max_consecutive skips in a row stop the run
  # with an error, its newest checkpoint intact.
  c.nonfinite = ml_collections.ConfigDict()
  c.nonfinite.max_consecutive = 5
  # Steps (1-based) whose loss is made NaN: a test of the guard.
  c.nonfinite.inject_nan_at_steps = ()

  # ---- Checkpoints --------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  # Save every this many steps (and after every evaluation and at the end).
  c.checkpoint.save_every_steps = 1000
  # Keep the newest keep_latest checkpoints plus the keep_best best ones by
  # eval accuracy; both sets are always preserved.
  c.checkpoint.keep_latest = 2
  c.checkpoint.keep_best = 1

  # ---- Samples (language models) -------------------------------------------
  # At each evaluation a language model continues `prompt` by num_tokens
  # sampled tokens (temperature), appended to WORKDIR/samples.txt and the
  # log; 0 tokens turns it off.
  c.samples = ml_collections.ConfigDict()
  c.samples.num_tokens = 200
  c.samples.prompt = '\n'
  c.samples.temperature = 0.8

  # ---- Outputs ------------------------------------------------------------
  # Write PNGs (curves, predictions, confusion matrix) at each evaluation.
  c.write_plots = True
  # Console progress bar (a plain log line per write when not a terminal).
  c.progress_bar = True

  return c


def apply_variant(c, arg, config_name: str):
  """Applies the variants every experiment config shares, named by `arg`.

  ':smoke' trains 40 steps of batch 32, evaluating and checkpointing at
  steps 20 and 40: a seconds-long run of the real code path, for tests.
  Anything else but no variant is an error.
  """
  if arg == 'smoke':
    c.batch_size = 32
    c.eval_batch_size = 500
    c.num_epochs = -1.0
    c.num_train_steps = 40
    c.eval_every_steps = 20
    c.log_every_steps = 10
    c.checkpoint.save_every_steps = 20
    c.optimizer.warmup_steps = 5
    c.progress_bar = False
  elif arg:
    raise ValueError(
        f"unknown variant {arg!r} of {config_name}; use ':smoke' or none")
  return c
