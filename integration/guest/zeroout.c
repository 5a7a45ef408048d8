/*
 * zeroout: tiny guest helper for the vublk guest smoke test.
 *
 *   zeroout DEVICE OFFSET LENGTH
 *
 * Issues the BLKZEROOUT ioctl on DEVICE for [OFFSET, OFFSET+LENGTH) bytes.
 * On a virtio-blk disk that offers VIRTIO_BLK_F_WRITE_ZEROES the guest kernel
 * turns this into WRITE_ZEROES requests (busybox's blkdiscard has no -z).
 * Built statically at guest build time; exit status 0 on success.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s DEVICE OFFSET LENGTH\n", argv[0]);
        return 2;
    }
    uint64_t range[2];
    range[0] = strtoull(argv[2], NULL, 0);
    range[1] = strtoull(argv[3], NULL, 0);
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        fprintf(stderr, "zeroout: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    if (ioctl(fd, BLKZEROOUT, range) != 0) {
        fprintf(stderr, "zeroout: BLKZEROOUT %s %llu+%llu: %s\n", argv[1],
                (unsigned long long)range[0], (unsigned long long)range[1], strerror(errno));
        close(fd);
        return 1;
    }
    if (close(fd) != 0) {
        fprintf(stderr, "zeroout: close: %s\n", strerror(errno));
        return 1;
    }
    return 0;
}
