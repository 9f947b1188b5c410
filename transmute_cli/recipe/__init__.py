"""The recipe: its schema and validation (schema, fields), the files it names (datafiles), the
answer checks (formats), chat rendering through the tokenizer's template (chat) and the shipped
chat pool a system prompt alone is fitted on (pool).  The names most callers need are here."""

from transmute_cli.recipe.pool import TURN_MARK, chat_pool, chat_pool_conversations, conversations
from transmute_cli.recipe.schema import Recipe, eval_queries, load_recipe, parse_recipe, recipe_yaml, with_labels

__all__ = ["Recipe", "TURN_MARK", "chat_pool", "chat_pool_conversations", "conversations", "eval_queries", "load_recipe", "parse_recipe",
           "recipe_yaml", "with_labels"]
