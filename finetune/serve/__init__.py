"""`finetune serve`: the ASGI app (OpenAI's API and a page), its request bodies and error shape, and how
engine events become replies.
"""
