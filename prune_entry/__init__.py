"""Entry points (prune, finetune, eval, search): parse and validate -> call the core -> log."""
