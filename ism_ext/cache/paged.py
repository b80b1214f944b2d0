"""`PagedAllocator`: which pages of a paged KV cache each sequence owns (block table, free list, refcounts).

It holds no keys or values: the cache's storage lives in `KVCache`, which asks the allocator for pages
before an append and copies the pages the allocator says must be copied (copy-on-write). All decisions
are made on a host mirror of the block table, so none of them waits on the device.
"""

from __future__ import annotations

import math

import torch

__all__ = ["PageCopy", "PagedAllocator"]

# (sequence, page slot, old page or -1, new page): one allocation; old >= 0 means "copy old into new first".
PageCopy = tuple[int, int, int, int]


class PagedAllocator:
    """Pages of ``num_pages`` for ``batch_size`` sequences of up to ``max_pages`` pages each.

    Every layer of a model shares one allocator, so a page index means the same token positions in every
    layer. ``fork`` shares pages between sequences; the first write into a shared page gets a fresh copy.
    """

    def __init__(self, batch_size: int, max_pages: int, num_pages: int, page_size: int, device: torch.device) -> None:
        """An allocator with every page free; the device block table starts as all -1 (no page)."""
        self.batch_size, self.max_pages, self.num_pages, self.page_size = batch_size, max_pages, num_pages, page_size
        # Host mirror of the block table (-1 = no page): allocation decisions never read the device.
        self._table: list[list[int]] = [[-1] * max_pages for _ in range(batch_size)]
        with torch.inference_mode(False):  # written in place later, inside inference mode or not
            self.block_table = torch.full((batch_size, max_pages), -1, dtype=torch.int32, device=device)
        self._refcount = [0] * num_pages
        # Popped from the end: pages are handed out in increasing order, which keeps dumps readable.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        """Pages not used by any sequence."""
        return len(self._free)

    def refcount(self, page: int) -> int:
        """How many sequences use ``page``."""
        return self._refcount[page]

    def pages(self, seq: int, n_tokens: int) -> list[int]:
        """The pages holding the first ``n_tokens`` tokens of ``seq``, in order."""
        return self._table[seq][: math.ceil(n_tokens / self.page_size)]

    def plan(self, seqs: list[int], starts: list[int], n_new: int) -> list[tuple[int, int, int]]:
        """(seq, page slot, old page or -1) for every slot an append of ``n_new`` tokens needs a fresh page for.

        A slot needs one when it has no page yet, or when its page is shared (refcount > 1): then it is
        copied first (copy-on-write), so the write cannot show through in the other sequences. Reference
        counts are simulated in order, so when two sharing sequences both write, the second one finds the
        page its own and writes in place. Raises RuntimeError, changing nothing, when too few pages are free.
        """
        refs: dict[int, int] = {}
        plan = []
        for s, start in zip(seqs, starts, strict=True):
            for slot in range(start // self.page_size, math.ceil((start + n_new) / self.page_size)):
                page = self._table[s][slot]
                if page < 0:
                    plan.append((s, slot, -1))
                    continue
                r = refs.get(page, self._refcount[page])
                if r > 1:
                    plan.append((s, slot, page))
                    refs[page] = r - 1
        if len(plan) > len(self._free):
            raise RuntimeError(
                f"KVCache: out of pages: this append needs {len(plan)} new pages but only {len(self._free)} of "
                f"{self.num_pages} are free; nothing was changed (truncate, reset or fork less, or give more num_pages)"
            )
        return plan

    def apply(self, plan: list[tuple[int, int, int]]) -> list[PageCopy]:
        """Takes a fresh page for every planned slot; returns the journal (the caller copies ``old`` pages)."""
        journal = []
        for s, slot, old in plan:
            new = self._free.pop()
            if old >= 0:
                self._refcount[old] -= 1
            self._refcount[new] = 1
            self._table[s][slot] = new
            journal.append((s, slot, old, new))
        self._sync_entries([(s, slot) for s, slot, _, _ in journal])
        return journal

    def undo(self, journal: list[PageCopy]) -> None:
        """Gives back the pages of `apply`'s journal (when the op rejected the append)."""
        for s, slot, old, new in reversed(journal):
            self._table[s][slot] = old
            self._refcount[new] = 0
            self._free.append(new)
            if old >= 0:
                self._refcount[old] += 1
        self._sync_entries([(s, slot) for s, slot, _, _ in journal])

    def release(self, seq: int, keep: int) -> None:
        """Drops ``seq``'s pages from slot ``keep`` on; a page goes back to the free list when no sequence uses it."""
        row = self._table[seq]
        changed = []
        for slot in range(keep, self.max_pages):
            page = row[slot]
            if page >= 0:
                self._refcount[page] -= 1
                if self._refcount[page] == 0:
                    self._free.append(page)
                row[slot] = -1
                changed.append((seq, slot))
        self._sync_entries(changed)

    def share(self, src: int, dst: int) -> None:
        """Makes ``dst`` use exactly ``src``'s pages (after `release` of ``dst``): reference counts go up."""
        row = list(self._table[src])
        for page in row:
            if page >= 0:
                self._refcount[page] += 1
        self._table[dst] = row
        self.block_table[dst] = self.block_table[src]

    def _sync_entries(self, entries: list[tuple[int, int]]) -> None:
        # One host-to-device copy for all changed entries instead of one per entry.
        if entries:
            device = self.block_table.device
            rows = torch.tensor([s for s, _ in entries], dtype=torch.long, device=device)
            cols = torch.tensor([slot for _, slot in entries], dtype=torch.long, device=device)
            vals = torch.tensor([self._table[s][slot] for s, slot in entries], dtype=torch.int32, device=device)
            self.block_table[rows, cols] = vals
