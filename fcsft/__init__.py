"""fcsft: the shared logic of the fc-sft scripts (fine-tuning small LLMs for function calling, scored on BFCL).

The top-level scripts (train_sft.py, eval_bfcl.py, sweep.py, ...) are entry points: argument parsing and a main()
over these modules. Nothing here imports a script, and the modules import each other without a cycle
(tests/test_imports.py checks both). One module per concern:

    errors            UserError, the one exception for bad input; the scripts turn it into one line and exit 1
    recipe            train_sft.py's recipe: ScriptArguments, parsing YAML + flags, the launch checks
    chat_formats      training rows -> chat messages: xLAM, messages, prompt/completion, Dolly
    data_formats      OpenAI, ShareGPT, Hermes, Glaive, ToolACE, APIGen-MT (+ auto) -> TRL conversational rows; checks
    training_data     sources, mixtures and the data recipe's transforms; per-source report
    decontamination   BFCL v4 test questions, and matching training requests against them
    bfcl_data         BFCL categories (single- and multi-turn), data files and result files (resumable, atomic)
    bfcl_prompts      BFCL entries -> prompts: chat messages + tools, or the official harness's text
    bfcl_checker      decoders and the AST checker (the official rules)
    bfcl_multi_turn   multi-turn: the official loop, execution on the environments, checker, the Overall
    bfcl_generation   models, tokenizers and batched generation for BFCL prompts
    bfcl_report       scores, the leaderboard's aggregates, summaries, comparisons, error analysis
    bfcl_train_eval   BFCL accuracy during training
    callbacks         trainer callbacks: run report, per-epoch checkpoints, gathered adapter checkpoints
    hub               the Hugging Face Hub: access check, folder push, token scrubbing
    model_card        model cards: one front-matter builder; run, epoch and merge cards; BFCL results
    metrics           device name, peak memory, MFU and peak FLOP/s, GPU table, price, durations
    distributed       FSDP on CPU, full state dicts, failing on every rank, free ports
    memory_estimate   peak memory of a training setup, from the architecture
    step_profile      torch.profiler traces of chosen steps and their compute/communication shares
    sweeps            sweep files -> points -> the real train/eval commands
    study_report      one results table (cost per BFCL point) for any set of run folders
    bench             training benchmark settings, runs and tables
    demo_assets       the offline default: tiny models, tokenizers and data
    merging           LoRA adapters merged into their base or combined
"""
