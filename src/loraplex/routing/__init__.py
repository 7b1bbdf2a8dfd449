"""Routing layer: choose the adapter that serves a request from its text (``model: "auto"``), or the base."""
from loraplex.routing.cards import CARD_FILE, AdapterCard, CardBook
from loraplex.routing.query import chat_query
from loraplex.routing.router import RouteDecision, Router
from loraplex.routing.rules import Rule, load_rules
from loraplex.routing.scorers import (
           EmbeddingScorer,
           LexicalScorer,
           Scorer,
           embedding_model_dir,
           make_scorer,
)

__all__ = ["CARD_FILE", "AdapterCard", "CardBook", "EmbeddingScorer", "LexicalScorer", "RouteDecision", "Router", "Rule",
           "Scorer", "chat_query", "embedding_model_dir", "load_rules", "make_scorer"]
