"""The viewer's tokens: where they come from, what each may do, and the session cookie."""

from __future__ import annotations

import pytest

from services.viewer.auth import COOKIE, OPERATOR, READ, TokenError, Tokens

R, O = "r" * 20, "o" * 24


def test_no_token_at_all_refuses_to_start():
    with pytest.raises(TokenError, match="PLANTSIGHT_VIEWER_TOKEN"):
        Tokens({})


def test_a_short_token_is_refused_by_name():
    with pytest.raises(TokenError, match="PLANTSIGHT_VIEWER_OPERATOR_TOKEN is shorter than 16"):
        Tokens({"PLANTSIGHT_VIEWER_OPERATOR_TOKEN": "short"})


def test_tokens_from_files_win_over_the_environment(tmp_path):
    f = tmp_path / "op"
    f.write_text(O + "\n")
    t = Tokens({"PLANTSIGHT_VIEWER_OPERATOR_TOKEN_FILE": str(f), "PLANTSIGHT_VIEWER_OPERATOR_TOKEN": "x" * 30})
    assert t.role_of_token(O) == OPERATOR
    assert t.role_of_token("x" * 30) is None
    with pytest.raises(TokenError, match="PLANTSIGHT_VIEWER_TOKEN_FILE=.*missing: cannot read the file"):
        Tokens({"PLANTSIGHT_VIEWER_TOKEN_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenError, match="empty"):
        Tokens({"PLANTSIGHT_VIEWER_TOKEN_FILE": str(tmp_path / "empty")})


def test_roles_from_bearer_and_cookie():
    t = Tokens({"PLANTSIGHT_VIEWER_TOKEN": R, "PLANTSIGHT_VIEWER_OPERATOR_TOKEN": O})
    assert t.role({"Authorization": f"Bearer {R}"}) == (READ, "bearer")
    assert t.role({"Authorization": f"bearer {O}"}) == (OPERATOR, "bearer")
    assert t.role({"Authorization": "Bearer nope"}) == (None, "bearer")
    assert t.role({}) == (None, "")
    header = t.cookie_header(O)
    assert "HttpOnly" in header and "SameSite=Strict" in header and O not in header
    value = header.split(";", 1)[0].split("=", 1)[1]
    assert t.role({"Cookie": f"other=1; {COOKIE}={value}"}) == (OPERATOR, "cookie")
    tampered = value[:-1] + ("0" if value[-1] != "0" else "1")
    assert t.role({"Cookie": f"{COOKIE}={tampered}"}) == (None, "cookie")
    # a cookie made for another token (e.g. before rotation) is worth nothing
    other = Tokens({"PLANTSIGHT_VIEWER_TOKEN": "z" * 20}).cookie_header("z" * 20).split(";", 1)[0]
    assert t.role({"Cookie": other}) == (None, "cookie")
