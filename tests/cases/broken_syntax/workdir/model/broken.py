"""A model plugin with a syntax error on line 3 (the missing parameter list's closing parenthesis)."""

def broken(:
    pass
