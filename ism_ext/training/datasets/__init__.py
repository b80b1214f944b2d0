"""The datasets that ship with ism_ext (toy_chat.jsonl and the script that writes it)."""
