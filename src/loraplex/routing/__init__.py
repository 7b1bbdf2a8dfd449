"""Routing layer: choose the adapter that serves a request from its text (``model: "auto"``), or the base."""
from loraplex.routing.calibration import GENERAL, CardCalibration, general_card
from loraplex.routing.cards import CARD_FILE, AdapterCard, CardBook
from loraplex.routing.embedders import ENCODERS, EmbeddingScorer, embedding_model_dir
from loraplex.routing.query import chat_query
from loraplex.routing.router import RECENT_DECISIONS, RouteDecision, Router
from loraplex.routing.rules import Rule, load_rules
from loraplex.routing.scorers import AUTO_ORDER, SCORER_NAMES, LexicalScorer, Scorer, make_scorer

__all__ = ["AUTO_ORDER", "RECENT_DECISIONS", "CARD_FILE", "ENCODERS", "GENERAL", "SCORER_NAMES", "AdapterCard", "CardBook",
           "CardCalibration", "EmbeddingScorer", "LexicalScorer", "RouteDecision", "Router", "Rule", "Scorer",
           "chat_query", "embedding_model_dir", "general_card", "load_rules", "make_scorer"]
