//! What the agent asks of glibc's allocator, so that its resident size
//! follows what it holds rather than the peak of its largest change.

/// Sets up glibc's allocator before anything allocates much.
///
/// Every allocation of 128 KiB or more is a mapping of its own, returned
/// to the kernel when freed. glibc starts at that threshold but raises it
/// to the largest block freed so far (up to 32 MiB), so after one large
/// apply the next one's buffers (requests, encoded documents, journal
/// records: megabytes each) came from the heap, and the small allocations
/// made between them kept its pages: at 100k rules that left the agent
/// 10 MiB larger. Setting the threshold turns the raising off.
///
/// One arena for every thread. glibc gives each thread that allocates an
/// arena of its own, and keeps the pages of one that has gone quiet:
/// `rules.json`'s writer builds its file from every rule in force, and its
/// arena held 12 MiB at 100k rules long after. The agent's threads seldom
/// allocate at once, so sharing costs no waiting worth the name.
pub fn configure_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets parameters of the allocator, under its lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands the memory a piece of work freed back to the kernel: the free
/// pages inside the heap, not only at its top. A large apply allocates its
/// request, plan and encoded rules in many small pieces, as `rules.json`'s
/// writer does its rules; glibc keeps freed pages, and the agent's
/// resident size would stay at that peak.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory; no pointer is kept.
    unsafe {
        libc::malloc_trim(0);
    }
}
